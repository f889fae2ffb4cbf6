"""The records nginx's Lua init reads (servers.json, drained.json) are checked before any reload: `nginx -t` does
not run init_by_lua, so a bad record would pass it and fail the reload. herd-gateway-drain refuses such a record,
says why, and changes nothing."""

import json
import os
import subprocess
import sys

from conftest import ROLE

DRAIN = os.path.join(ROLE, "files", "herd-gateway-drain")
GOOD = {"servers": [{"key": "g1:0", "host": "g1", "address": "10.0.0.1", "port": 11434, "endpoint": "10.0.0.1:11434",
                     "max_conns": 2, "weight": 2, "models": ["tiny:latest"]},
                    {"key": "g2:0", "host": "g2", "address": "gpu2.lab", "port": 11434, "endpoint": "gpu2.lab:11434",
                     "max_conns": 1, "weight": 1, "models": []}]}


def run(tmp_path, *args):
    env = dict(os.environ, HERD_GATEWAY_STATE_DIR=str(tmp_path), HERD_NGINX_BIN="/bin/true")
    return subprocess.run([sys.executable, DRAIN, *args], env=env, capture_output=True, text=True, check=False)


def test_validate_servers(tmp_path):
    path = tmp_path / "candidate.json"
    path.write_text(json.dumps(GOOD))
    assert run(tmp_path, "validate-servers", str(path)).returncode == 0
    bad = json.loads(json.dumps(GOOD))
    bad["servers"][0].update(port="11434", address="a b;rm", max_conns=0)
    bad["servers"][1]["key"] = "g1:0"
    path.write_text(json.dumps(bad))
    result = run(tmp_path, "validate-servers", str(path))
    assert result.returncode == 2
    for words in ("port '11434' is not 1-65535", "address 'a b;rm'", "max_conns 0", "key must be 'host:id'"):
        assert words in result.stderr, result.stderr
    path.write_text("{not json")
    assert run(tmp_path, "validate-servers", str(path)).returncode == 2


def test_drain_refuses_a_bad_record_and_changes_nothing(tmp_path):
    (tmp_path / "servers.json").write_text(json.dumps(GOOD))
    (tmp_path / "drained.json").write_text('{"g1": true}')
    result = run(tmp_path, "drain", "g2")
    assert result.returncode == 2 and "drained.json is not a list" in result.stderr
    assert (tmp_path / "drained.json").read_text() == '{"g1": true}'
    (tmp_path / "drained.json").write_text('["g1"]')
    assert run(tmp_path, "validate-drained", str(tmp_path / "drained.json")).returncode == 0
    (tmp_path / "candidate.json").write_text('["g9"]')
    result = run(tmp_path, "validate-drained", str(tmp_path / "candidate.json"))
    assert result.returncode == 2 and "'g9' names no gateway server" in result.stderr
    (tmp_path / "servers.json").write_text(json.dumps({"servers": [{"key": "x"}]}))
    result = run(tmp_path, "drain", "g1")
    assert result.returncode == 2 and "servers.json refused" in result.stderr
    assert (tmp_path / "drained.json").read_text() == '["g1"]'


def test_drain_still_works(tmp_path):
    (tmp_path / "servers.json").write_text(json.dumps(GOOD))
    result = run(tmp_path, "drain", "g2:0")
    assert result.returncode == 0, result.stderr
    # No admin location in this record (no upstream.loopback_url): the record goes in by nginx -t and a reload.
    assert json.loads(result.stdout) == {"changed": True, "drained": ["g2:0"], "servers": ["g2:0"], "applied": "reload"}
    assert json.loads((tmp_path / "drained.json").read_text()) == ["g2:0"]


def test_concurrent_drains_and_returns_lose_no_update(tmp_path):
    """A batch of a rolling re-deploy drains (then returns) several hosts on one gateway at once: each call holds
    the record's lock from reading to writing it, so every drain stays in the record and every return leaves it."""
    hosts = [f"g{i}" for i in range(1, 9)]
    servers = {"servers": [dict(GOOD["servers"][0], key=f"{h}:0", host=h, address=f"10.0.0.{i + 1}",
                                endpoint=f"10.0.0.{i + 1}:11434") for i, h in enumerate(hosts)]}
    (tmp_path / "servers.json").write_text(json.dumps(servers))
    env = dict(os.environ, HERD_GATEWAY_STATE_DIR=str(tmp_path), HERD_NGINX_BIN="/bin/true",
               HERD_NGINX_CHECK_BIN="/bin/true")

    def together(action, names):
        procs = [subprocess.Popen([sys.executable, DRAIN, action, h], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for h in names]
        results = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
        assert all(rc == 0 for rc, _ in results), results

    together("drain", hosts)
    assert sorted(json.loads((tmp_path / "drained.json").read_text())) == hosts
    together("undrain", hosts[:6])
    assert sorted(json.loads((tmp_path / "drained.json").read_text())) == hosts[6:]
    assert (tmp_path / ".drained.lock").exists()
    # the lock file is never followed through a link planted in its place
    (tmp_path / ".drained.lock").unlink()
    (tmp_path / ".drained.lock").symlink_to(tmp_path / "elsewhere")
    result = subprocess.run([sys.executable, DRAIN, "list"], env=env, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and not (tmp_path / "elsewhere").exists(), result
