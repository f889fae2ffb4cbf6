"""Shared by the molecule scenarios' tests: report a measurement so that `make test` prints it at the end."""

import os


def measured(line):
    """Print a measurement and keep it for `make test`'s summary (.molecule-logs/measurements.txt)."""
    print(line)
    logs = os.path.join(os.environ.get("MOLECULE_PROJECT_DIRECTORY", "."), ".molecule-logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, "measurements.txt"), "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
