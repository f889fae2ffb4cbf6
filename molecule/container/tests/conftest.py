"""On a failed check, print what explains it: the containers, their logs, the engine's journal, the hook log."""

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture(autouse=True)
def _logs_on_failure(request, host):
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        out = host.run(
            "docker ps -a; for c in $(docker ps -aq --filter label=herd.ollama.instance); do "
            "docker logs --tail 20 $c 2>&1; done; journalctl --no-pager -n 40 -u docker; "
            "tail -n 5 /var/log/herd-lab/nvidia-container-runtime-hook.log"
        )
        print(f"\n--- state of {host.backend.get_hostname()} ---\n{out.stdout}{out.stderr}")
