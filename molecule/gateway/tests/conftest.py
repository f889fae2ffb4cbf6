"""Helpers of the gateway scenario's verify: run the test client on a lab host, run playbooks against the lab."""

import json
import os
import shlex
import subprocess

import pytest
import testinfra

KEY = "h4-lab-key-team-a-0123456789abcdef"
GW = "http://127.0.0.1"
SCENARIO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.dirname(os.path.dirname(SCENARIO))


def _host(name):
    return testinfra.get_host("docker://" + name)


@pytest.fixture(scope="session")
def gw():
    return _host("h4-gw")


@pytest.fixture(scope="session")
def client():
    return _host("h4-client")


def call(host, method, url, key=None, body=None):
    args = ["h4-client", "request", method, url]
    if key:
        args += ["--key", key]
    if body is not None:
        args += ["--body", json.dumps(body)]
    out = host.check_output(" ".join(shlex.quote(a) for a in args))
    return json.loads(out)


def stream(host, url=GW + "/api/generate", tokens=40, key=KEY, model="herd-tiny:1b"):
    return json.loads(host.check_output("h4-client stream %s --key %s --tokens %s --model %s", url, key, str(tokens),
                                        model))


def access_log(host):
    text = host.file("/var/log/nginx/herd-gateway.access.log").content_string
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pools(host):
    return {p["name"]: p for p in json.loads(host.check_output("curl -sf http://127.0.0.1/herd/pools"))["pools"]}


def playbook(path, *extra):
    """Run a playbook against the scenario's inventory; return (rc, output)."""
    inventory = os.environ.get("MOLECULE_INVENTORY_FILE")
    if not inventory:
        pytest.skip("needs molecule's inventory (run through molecule verify)")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "ansible.cfg"),
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1")
    result = subprocess.run(["ansible-playbook", "-i", inventory, path, *extra], cwd=PROJECT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, check=False)
    return result.returncode, result.stdout


def dump_journal(host):
    return host.run("journalctl -u nginx --no-pager -n 30; tail -n 20 /var/log/nginx/error.log").stdout
