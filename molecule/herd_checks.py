"""Shared by the molecule scenarios' tests: run a command in a lab container, wait for a condition, run a playbook
against the scenario's inventory, read an instance's environment file, and show a host's state when a check fails.

A scenario's tests import it as test_faults.py does (`sys.path` gets MOLECULE_PROJECT_DIRECTORY/molecule); a
scenario's conftest.py imports `pytest_runtest_makereport` and builds its autouse fixture with `state_on_failure`.
"""

import json
import os
import subprocess
import time

import pytest


def sh(container, cmd, timeout=60):
    """`bash -c cmd` in a lab container (docker exec); the CompletedProcess, output as text."""
    return subprocess.run(["docker", "exec", container, "bash", "-c", cmd], capture_output=True, text=True,
                          timeout=timeout)


def wait(predicate, limit, step=0.25):
    """Seconds until predicate() is true, or None after `limit` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    return None


def playbook(*args, timeout=600, env=None):
    """ansible-playbook against the scenario's inventory; (return code, stdout + stderr)."""
    run = subprocess.run(["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], *args], capture_output=True,
                         text=True, timeout=timeout, env=env)
    return run.returncode, run.stdout + run.stderr


def gateway_spread(host, model, n, body_path):
    """n generate requests with distinct prompts (conversation affinity keeps a repeated prompt on the instance
    that served it) through the host's gateway, each answered 200 and done; (the upstreams that answered, named by
    X-Herd-Upstream, and the answers)."""
    seen, bodies = set(), []
    for i in range(n):
        out = host.run(
            f"curl -sS -D - -o {body_path} http://127.0.0.1/api/generate "
            f"""-d '{{"model":"{model}","prompt":"spread {i}","stream":false,"options":{{"num_predict":4}}}}'"""
        )
        assert out.rc == 0 and " 200 " in out.stdout.splitlines()[0], out.stdout + out.stderr
        seen.update(line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
                    if line.lower().startswith("x-herd-upstream:"))
        bodies.append(json.loads(host.file(body_path).content_string))
        assert bodies[-1]["done"] is True
    return seen, bodies


def verified_layers(host, models, manifest="registry.ollama.ai/library/herd-tiny/1b"):
    """The layers of `manifest` in the model store `models`, after checking that each blob is there with its size
    and sha256."""
    path = host.file(f"{models}/manifests/{manifest}")
    assert path.exists, path.path
    layers = json.loads(path.content_string)["layers"]
    for layer in layers:
        blob = host.file(f"{models}/blobs/" + layer["digest"].replace(":", "-"))
        assert blob.exists and blob.size == layer["size"]
        assert "sha256:" + host.check_output(f"sha256sum {blob.path}").split()[0] == layer["digest"]
    return layers


def start_times(host, count):
    """When each of instances 0..count-1 (ollama@i) last started, as systemd's monotonic stamps: a restart changes it."""
    return [host.run(f"systemctl show -p ExecMainStartTimestampMonotonic --value ollama@{i}").stdout.strip()
            for i in range(count)]


def env_file(host, i):
    """Instance i's environment file (/etc/herd/ollama/<i>.env) as a dict, quotes removed."""
    out = {}
    for line in host.file(f"/etc/herd/ollama/{i}.env").content_string.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value.strip('"')
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (item.rep_call), for state_on_failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


def state_on_failure(command, title):
    """An autouse fixture that prints `command`'s output on the host under test after a failed check."""

    @pytest.fixture(autouse=True, name="state_on_failure")
    def _state_on_failure(request, host):
        yield
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            out = host.run(command)
            print(f"\n--- {title} of {host.backend.get_hostname()} ---\n{out.stdout}{out.stderr}")

    return _state_on_failure
