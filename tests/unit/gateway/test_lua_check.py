"""What nginx will load is checked before every reload (issue 26 item 7): `nginx -t` does not run init_by_lua, so
herd-nginx-check also starts nginx on its private copy with HERD_GATEWAY_CHECK=1 and the gateway's own init loads
the settings, servers.json and drained.json (or the candidate records named by --servers / --drained), then ends
the process. A refused file fails the check with init's message and nothing installed changes; the drain command
runs the same check on the record it is about to write."""

import json
import os
import subprocess
import sys

import pytest
from conftest import NGINX, ROLE, gateway_config, render

CHECK = os.path.join(ROLE, "files", "herd-nginx-check")
DRAIN = os.path.join(ROLE, "files", "herd-gateway-drain")
CONF = "etc/nginx/conf.d/herd-gateway.conf.j2"
UP = {"name": "herd_ollama", "zone_size": "256k", "keepalive": 8, "drain": []}
SERVERS = {"upstream": UP, "servers": [
    {"key": "h:0", "host": "h", "address": "127.0.0.1", "port": 11434, "endpoint": "127.0.0.1:11434",
     "name": "ollama", "num_parallel": 1, "max_conns": 1, "weight": 1, "backup": False, "models": ["a:1"]}]}


def installed(tmp_path, **overrides):
    """A gateway configuration tree under tmp_path/root (nginx.conf, the gateway, its records); returns the root."""
    if NGINX is None:
        pytest.skip("nginx is not installed here")
    root = tmp_path / "root"
    root.mkdir()
    text = render(CONF, _gateway_upstream=UP, _gateway_keys=[], gateway_http_port=1, **overrides)
    upstream = render("etc/nginx/herd/gateway-upstream.conf.j2", _gateway_servers=SERVERS["servers"],
                      _gateway_upstream=UP)
    gateway_config(root, text, {"/etc/nginx/herd/gateway-upstream.conf": upstream}, servers=SERVERS, drained=["h:0"])
    return root


def check(root, *args):
    env = dict(os.environ, HERD_NGINX_CONF_ROOT=str(root), HERD_NGINX_BIN=NGINX)
    return subprocess.run([sys.executable, CHECK, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, check=False, timeout=60)


def snapshot(root):
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "logs" not in p.parts
            and p.suffix != ".log" and p.name != "nginx.pid"}


def test_nginx_t_alone_passes_what_init_refuses(tmp_path):
    # The reason for the check: a servers.json that is not JSON passes nginx -t.
    root = installed(tmp_path)
    (root / "var/lib/herd/gateway/servers.json").write_text("{not json")
    result = subprocess.run([NGINX, "-t", "-q", "-p", str(root), "-c", str(root / "nginx.conf")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    result = check(root)
    assert result.returncode != 0 and "is not JSON" in result.stdout, result.stdout


def test_good_files_pass(tmp_path):
    root = installed(tmp_path)
    before = snapshot(root)
    result = check(root)
    assert result.returncode == 0, result.stdout
    candidate = tmp_path / "servers.json"
    candidate.write_text(json.dumps(SERVERS))
    assert check(root, "--servers", candidate).returncode == 0
    assert snapshot(root) == before


@pytest.mark.parametrize("kind, text, words", [
    ("servers", "{not json", "is not JSON"),
    ("servers", json.dumps({"servers": [{"key": "h:0", "host": "h", "address": "a b;rm", "port": 1,
                                         "endpoint": "x"}]}), "bad server address a b;rm"),
    ("drained", '{"h": true}', "is not a JSON list"),
    ("drained", "[1]", "entry 1 is not"),
    ("drained", "[", "is not JSON"),
])
def test_a_refused_record_fails_with_init_message_and_nothing_changes(tmp_path, kind, text, words):
    root = installed(tmp_path)
    before = snapshot(root)
    candidate = tmp_path / "candidate.json"
    candidate.write_text(text)
    result = check(root, f"--{kind}", candidate)
    assert result.returncode != 0 and words in result.stdout, result.stdout
    assert "init_by_lua" in result.stdout
    assert snapshot(root) == before


def test_a_refused_setting_in_the_candidate_config_fails(tmp_path):
    root = installed(tmp_path)
    conf = root / "herd-gateway.conf"
    before = snapshot(root)
    bad = conf.read_text().replace('"queue_timeout": "120s"', '"queue_timeout": "2 minutes"')
    assert bad != conf.read_text()
    candidate = tmp_path / "candidate.conf"
    candidate.write_text(bad)
    result = check(root, conf, candidate)
    assert result.returncode != 0 and "bad duration 2 minutes" in result.stdout, result.stdout
    assert snapshot(root) == before


def test_drain_command_runs_the_lua_check_before_writing(tmp_path):
    root = installed(tmp_path)
    state = root / "var/lib/herd/gateway"
    wrapper = tmp_path / "check.sh"
    wrapper.write_text(f"#!/bin/sh\nHERD_NGINX_CONF_ROOT={root} HERD_NGINX_BIN={NGINX} exec {sys.executable} {CHECK} \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, HERD_GATEWAY_STATE_DIR=str(state), HERD_NGINX_BIN="/bin/true",
               HERD_NGINX_CHECK_BIN=str(wrapper))

    def drain(*args):
        return subprocess.run([sys.executable, DRAIN, *args], env=env, capture_output=True, text=True, check=False,
                              timeout=120)

    bad = tmp_path / "bad.json"
    bad.write_text('{"h": true}')
    result = drain("validate-drained", str(bad))
    assert result.returncode == 2 and "refused" in result.stderr
    good = tmp_path / "good.json"
    good.write_text('["h"]')
    assert drain("validate-drained", str(good)).returncode == 0
    servers = tmp_path / "servers.json"
    servers.write_text("{not json")
    assert drain("validate-servers", str(servers)).returncode == 2
    # A real change: the record passes the gateway's init, then is written (applied by reload here: /bin/true).
    result = drain("undrain", "h")
    assert result.returncode == 0, result.stderr
    assert json.loads((state / "drained.json").read_text()) == []


def _deny_write_execute():
    """What systemd's MemoryDenyWriteExecute= does to herd-guard and the drain command it runs: no memory may
    become executable once writable (prctl PR_SET_MDWE, Linux 6.3 or later)."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        os._exit(77)


@pytest.mark.parametrize("servers", ["good", "not json"])
def test_the_check_runs_where_memory_cannot_be_made_executable(tmp_path, servers):
    """herd-guard's unit has MemoryDenyWriteExecute=true, and LuaJIT's compiler needs executable memory: the check
    run interprets only (jit.off in check mode). Found by selfheal: every drain failed with LuaJIT's "runtime code
    generation failed, restricted kernel?" panic."""
    root = installed(tmp_path)
    if servers != "good":
        (root / "var/lib/herd/gateway/servers.json").write_text("{not json")
    env = dict(os.environ, HERD_NGINX_CONF_ROOT=str(root), HERD_NGINX_BIN=NGINX)
    result = subprocess.run([sys.executable, CHECK], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, check=False, timeout=60, preexec_fn=_deny_write_execute)
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert "PANIC" not in result.stdout, result.stdout
    if servers == "good":
        assert result.returncode == 0, result.stdout
    else:
        assert result.returncode != 0 and "is not JSON" in result.stdout, result.stdout
