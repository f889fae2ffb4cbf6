"""On a failed check, print the journal of the services under test (docker, nginx, lab repository server)."""

import os
import sys

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import pytest_runtest_makereport, state_on_failure  # noqa: E402, F401 (the hook pytest calls)

_journal_on_failure = state_on_failure(
    "journalctl --no-pager -n 60 -u docker -u containerd -u nginx -u herd-lab-nvidia-repo; cat /etc/docker/daemon.json",
    "journal",
)
