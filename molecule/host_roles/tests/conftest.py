"""On a failed check, print the journal of the services under test (docker, nginx, lab repository server)."""

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture(autouse=True)
def _journal_on_failure(request, host):
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        out = host.run(
            "journalctl --no-pager -n 60 -u docker -u containerd -u nginx -u herd-lab-nvidia-repo; cat /etc/docker/daemon.json"
        )
        print(f"\n--- journal of {host.backend.get_hostname()} ---\n{out.stdout}{out.stderr}")
