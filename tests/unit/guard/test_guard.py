"""herd-guard (roles/guard/files/herd_guard.py): probes against real local HTTP servers (a healthy instance, a
hung one that accepts and never answers, a busy one), the pool rule, restarts and drains with a recorded run."""

import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from herd_testing import load_module

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
g = load_module("roles/guard/files/herd_guard.py", "herd_guard")

MODEL = "herd-tiny:1b"


def _config(tmp_path, **over):
    cfg = {"host": "gpu1", "listen_address": "127.0.0.1", "port": 9856, "interval": 0.2, "probe_timeout": 0.5,
           "canary_timeout": 0.5, "failures": 3, "restart_failures": 3, "passes": 2, "warm_timeout": 3, "restart_interval": 60,
           "local": None, "gateway": None}
    cfg.update(over)
    return cfg


class _Instance(BaseHTTPRequestHandler):
    generate_status = 200

    def do_GET(self):  # noqa: N802
        self._json(200, {"models": [{"name": MODEL, "model": MODEL}]})

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length))
        assert body["options"]["num_predict"] == 1 and body["stream"] is False
        self._json(self.generate_status, {"model": body["model"], "response": "o", "done": True})

    def _json(self, status, data):
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_a):
        pass


class _Busy(_Instance):
    generate_status = 503


@pytest.fixture
def server():
    servers = []

    def start(handler):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def hung():
    """A listening socket nobody reads: connections are accepted by the kernel and never answered (kill -STOP)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_probe_and_canary_of_a_healthy_instance(server):
    base = server(_Instance)
    assert g.probe(base, 1)[:2] == (True, {MODEL: None})
    assert g.canary(base, MODEL, 1)[0] == "pass"


def test_expiries_read_ollamas_timestamps():
    now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    body = json.dumps({"models": [
        {"name": "a:1b", "expires_at": "2027-01-15T08:00:12.123456789Z"},  # Go's RFC 3339 with nanoseconds
        {"name": "b:7b", "expires_at": "2027-01-15T09:00:05+01:00"},
        {"name": "c:1b", "expires_at": "2319-03-02T10:00:00.5Z"},  # keep_alive -1: now + MaxInt64 ns
        {"name": "d:1b", "expires_at": "soon"},
        {"model": "e:1b"}]})
    got = g.expiries(body, now)
    assert round(got["a:1b"], 3) == 12.123 and round(got["b:7b"]) == 5 and got["c:1b"] > g.FOREVER_AFTER
    assert got["d:1b"] is None and got["e:1b"] is None


@pytest.mark.parametrize(("remaining", "keep_alive"), [
    (None, None), (12.9, "12900ms"), (1.2, "1200ms"), (0.6, "skip"), (-3, "skip"), (86400 * 365 * 290, -1)])
def test_canary_never_extends_residency(remaining, keep_alive):
    assert g.canary_keep_alive(remaining) == keep_alive


def test_hung_instance_fails_within_the_timeouts(hung):
    ok, _models, why = g.probe(hung, 0.3)
    assert not ok and "timed out" in why
    assert g.canary(hung, MODEL, 0.3)[0] == "fail"


def test_busy_answer_is_not_a_failure(server):
    assert g.canary(server(_Busy), MODEL, 1)[0] == "busy"


def test_target_counts_rounds_and_canary_results(server, hung, tmp_path):
    cfg = _config(tmp_path)
    good = g.Target("gpu1:0", server(_Instance), [MODEL], cfg)
    for _ in range(3):
        assert good.round()[0]
        good.canary_thread.join(2)
    assert good.failed == 0 and good.passed == 3 and good.counts["pass"] >= 2
    bad = g.Target("gpu1:1", hung, [MODEL], cfg)
    for n in (1, 2, 3):
        assert not bad.round()[0]
        assert bad.failed == n
    assert bad.passed == 0


def test_pools_never_lose_their_last_healthy_instance():
    servers = [{"key": "a:0", "host": "a", "models": ["m1"]}, {"key": "a:1", "host": "a", "models": ["m1", "m2"]},
               {"key": "b:0", "host": "b", "models": ["m2"]}]
    assert g.last_healthy_pools("a:0", servers, {"a:0"}) == []
    assert g.last_healthy_pools("a:0", servers, {"a:0", "a:1"}) == ["m1"]
    assert g.last_healthy_pools("a:1", servers, {"a:1", "b:0"}) == ["m2"]
    anything = [{"key": "a:0", "host": "a", "models": []}, {"key": "a:1", "host": "a", "models": []}]
    assert g.last_healthy_pools("a:0", anything, {"a:0"}) == []
    assert g.last_healthy_pools("a:0", anything, {"a:0", "a:1"}) == ["*"]


@pytest.mark.parametrize("bad", [{"failures": 0}, {"interval": 0}, {"port": 70000}, {"local": None, "gateway": None},
                                 {"gateway": {"servers_file": "x", "drained_file": "/d", "drain_command": "/c", "state_file": "/s"}}])
def test_check_config_refuses_bad_settings(tmp_path, bad):
    cfg = _config(tmp_path, local={"mode": "systemd", "instances": []})
    cfg.update(bad)
    with pytest.raises(ValueError):
        g.check_config(cfg)


class _Run:
    """Stands in for subprocess.run and records argv."""

    def __init__(self, rc=0):
        self.calls, self.rc = [], rc

    def __call__(self, argv, **_kw):
        self.calls.append(list(argv))
        return subprocess.CompletedProcess(argv, self.rc, "", "" if self.rc == 0 else "unknown target")


def _gateway(tmp_path, servers, drained=()):
    (tmp_path / "servers.json").write_text(json.dumps({"servers": servers}))
    (tmp_path / "drained.json").write_text(json.dumps(list(drained)))
    return {"servers_file": str(tmp_path / "servers.json"), "drained_file": str(tmp_path / "drained.json"),
            "drain_command": "/usr/local/sbin/herd-gateway-drain", "state_file": str(tmp_path / "guard.json")}


def _servers(good, bad):
    return [{"key": "gpu1:0", "host": "gpu1", "endpoint": good.split("//")[1], "models": [MODEL]},
            {"key": "gpu1:1", "host": "gpu1", "endpoint": bad.split("//")[1], "models": [MODEL]}]


def _rounds(guard, n):
    for _ in range(n):
        servers = guard.gateway_servers()
        for s in servers:
            guard.targets[s["key"]].round()
        guard.gateway_act(servers)


def test_gateway_drains_after_k_failures_and_undrains_after_passes(tmp_path, server, hung):
    good = server(_Instance)
    cfg = _config(tmp_path, gateway=_gateway(tmp_path, _servers(good, hung)))
    run = _Run()
    guard = g.Guard(cfg, run=run)
    _rounds(guard, 2)
    assert run.calls == []
    _rounds(guard, 1)
    assert run.calls == [["/usr/local/sbin/herd-gateway-drain", "drain", "gpu1:1"]]
    assert json.loads((tmp_path / "guard.json").read_text()) == ["gpu1:1"]
    assert 'herd_guard_actions_total{server="gpu1:1",action="drain"} 1' in guard.metrics()
    # The instance answers again (now served by a healthy server): undrained after `passes` good rounds.
    guard.targets["gpu1:1"].base = good
    _rounds(guard, 1)
    assert len(run.calls) == 1
    _rounds(guard, 1)
    assert run.calls[-1] == ["/usr/local/sbin/herd-gateway-drain", "undrain", "gpu1:1"]
    assert json.loads((tmp_path / "guard.json").read_text()) == []
    # A new guard starts from the saved record.
    assert g.Guard(cfg, run=run).drained == set()


def test_gateway_keeps_the_last_healthy_instance_and_leaves_operator_drains(tmp_path, server, hung):
    good = server(_Instance)
    # gpu1:0 is drained by an operator (rolling deploy): gpu1:1, hung, is the last one of the pool.
    cfg = _config(tmp_path, gateway=_gateway(tmp_path, _servers(good, hung), drained=["gpu1:0"]))
    run = _Run()
    guard = g.Guard(cfg, run=run)
    _rounds(guard, 4)
    assert run.calls == []
    assert 'herd_guard_actions_total{server="gpu1:1",action="drain_refused"} 1' in guard.metrics()


def test_failed_drain_is_counted_and_retried(tmp_path, server, hung):
    cfg = _config(tmp_path, gateway=_gateway(tmp_path, _servers(server(_Instance), hung)))
    run = _Run(rc=1)
    guard = g.Guard(cfg, run=run)
    _rounds(guard, 4)
    assert len(run.calls) == 2 and guard.drained == set()
    assert 'action="drain_failed"} 2' in guard.metrics()


def test_local_restart_then_waits_until_warm(tmp_path, server, hung):
    good = server(_Instance)
    inst = {"id": 1, "port": 1, "local_url": "http://[::1]:1", "models": [MODEL], "unit": "ollama@1.service", "container": "herd-ollama-1"}
    cfg = _config(tmp_path, local={"mode": "systemd", "instances": [inst]})
    run = _Run()
    guard = g.Guard(cfg, run=run)
    target, _inst = guard.local_targets()[0]
    assert target.base == "http://[::1]:1"  # the plan's local_url, as published
    target.base = hung
    target.loaded = [MODEL]
    for _ in range(3):
        target.round()
    assert target.failed == 3

    def restarted(argv, **kw):
        target.base = good  # the restarted unit answers again
        return run(argv, **kw)

    guard.run = restarted
    guard.restart(target, inst)
    assert run.calls == [["systemctl", "restart", "ollama@1.service"]]
    assert target.failed == 0
    # At most one restart per restart_interval.
    guard.restart(target, inst)
    assert len(run.calls) == 1
    m = guard.metrics()
    assert 'herd_guard_actions_total{server="gpu1:1",action="restart"} 1' in m


def test_container_mode_restarts_the_container(tmp_path, server):
    inst = {"id": 0, "port": 1, "local_url": "http://127.0.0.1:1", "models": [], "unit": "ollama@0.service", "container": "herd-ollama-0"}
    cfg = _config(tmp_path, local={"mode": "container", "instances": [inst]})
    run = _Run()
    guard = g.Guard(cfg, run=run)
    target = g.Target("gpu1:0", server(_Instance), [], cfg)
    guard.restart(target, inst)
    assert run.calls == [["docker", "restart", "-t", "10", "herd-ollama-0"]]


def test_load_config_skips_the_managed_comment(tmp_path):
    path = tmp_path / "guard.json"
    cfg = _config(tmp_path, local={"mode": "systemd", "instances": []})
    path.write_text("#\n# Ansible managed\n#\n" + json.dumps(cfg))
    assert g.check_config(g.load_config(str(path)))["failures"] == 3
    assert g.main(["--check", "--config", str(path)]) == 0


class _GenerationHangs(_Instance):
    """Answers /api/ps at once but never finishes a generate (Ollama issues 1378 and 15950)."""

    def do_POST(self):  # noqa: N802
        time.sleep(2)
        try:
            self._json(200, {"done": True})
        except OSError:
            pass  # the guard gave up long ago


def test_instance_that_answers_but_never_generates_fails_by_its_canaries(server, tmp_path):
    cfg = _config(tmp_path, canary_timeout=0.3)
    target = g.Target("gpu1:0", server(_GenerationHangs), [MODEL], cfg)
    for _ in range(12):
        target.round()
        if target.failed >= 3:
            break
        time.sleep(0.2)
    assert target.failed >= 3 and target.live_failed == 0 and target.canary_failed >= 3
    assert "generate" in target.why and target.counts["fail"] >= 3


class _Emptied(_Instance):
    """Generates nothing (503-free failure) while a model is loaded; later restarted with nothing loaded."""
    loaded = True

    def do_GET(self):  # noqa: N802
        self._json(200, {"models": [{"name": MODEL, "model": MODEL}] if _Emptied.loaded else []})

    def do_POST(self):  # noqa: N802
        self._json(500, {"error": "runner gone"})


def test_an_instance_back_with_nothing_loaded_is_healthy_again(server, tmp_path):
    target = g.Target("gpu2:1", server(_Emptied), [MODEL], _config(tmp_path))
    for _ in range(4):
        target.round()
        target.canary_thread.join(2)
    target.round()
    target.canary_thread.join(2)
    assert target.canary_failed >= 3 and target.failed >= 3
    _Emptied.loaded = False  # restarted: answers /api/ps, holds no model, so no canary can run
    healthy, _why = target.round()
    assert healthy and target.failed == 0 and target.canary_failed == 0
