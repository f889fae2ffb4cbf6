"""On a failed check, print what explains it: the containers, their logs, the engine's journal, the hook log."""

import os
import sys

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import pytest_runtest_makereport, state_on_failure  # noqa: E402, F401 (the hook pytest calls)

_logs_on_failure = state_on_failure(
    "docker ps -a; for c in $(docker ps -aq --filter label=herd.ollama.instance); do "
    "docker logs --tail 20 $c 2>&1; done; journalctl --no-pager -n 40 -u docker; "
    "tail -n 5 /var/log/herd-lab/nvidia-container-runtime-hook.log",
    "state",
)
