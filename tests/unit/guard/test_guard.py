"""herd-guard (roles/guard/files/herd_guard.py): probes against real local HTTP servers (a healthy instance, a
hung one that accepts and never answers, a busy one), the gateway's pool rule, progress (busy is not hung),
restarts (gated by the gateways, backoff, cap, one at a time) and drains with a recorded run."""

import json
import os
import socket
import subprocess
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
           "stall_seconds": 30, "restart_max_per_hour": 6, "peers": [], "local": None, "gateway": None}
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
def server(run_server):
    def start(handler):
        srv = run_server(ThreadingHTTPServer(("127.0.0.1", 0), handler))
        return f"http://127.0.0.1:{srv.server_address[1]}"

    return start


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


class _EmbedOnly(_Instance):
    """An instance whose model only embeds, as Ollama answers it: generate 400, embed 200."""

    paths = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        _EmbedOnly.paths.append(self.path)
        if self.path == "/api/embed":
            assert body["input"] and "options" not in body
            return self._json(200, {"model": body["model"], "embeddings": [[0.6, 0.8]]})
        return self._json(400, {"error": f'"{body["model"]}" does not support generate'})


def test_canary_of_an_embedding_only_model_embeds(server):
    """An embedding-only model fails every generate (400): the canary learns it from Ollama's answer and embeds,
    so the guard never takes such an instance for broken."""
    base = server(_EmbedOnly)
    g.EMBED_ONLY.discard("embed-only:v1")
    assert g.canary(base, "embed-only:v1", 1) == ("pass", "embedded")
    assert g.canary(base, "embed-only:v1", 1) == ("pass", "embedded")
    assert _EmbedOnly.paths == ["/api/generate", "/api/embed", "/api/embed"]
    g.EMBED_ONLY.discard("embed-only:v1")


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


def _pools_doc(*instances):
    """A gateway's /herd/pools "instances": (key, endpoint, pools, extra fields)."""
    return {"pools": [], "instances": [dict({"key": k, "endpoint": e, "pools": p, "inflight": 0, "max_conns": 4,
                                             "num_parallel": 2, "drained": False, "down": False}, **extra)
                                       for k, e, p, extra in instances]}


def test_pool_membership_is_the_gateways():
    """The gateway's rule: an instance without a model list is in pool "*" only, not in every pool."""
    view = g.pools_view(_pools_doc(("gpu1:0", "a:1", ["big:latest", "*"], {}), ("gpu1:1", "a:2", ["*"], {}),
                                   ("gpu2:0", "b:1", ["small:latest", "*"], {"drained": True, "down": True})))
    assert view["gpu1:0"]["last"] == ["big:latest"]
    assert view["gpu1:1"]["last"] == [] and view["gpu2:0"]["last"] == ["small:latest"]
    view = g.pools_view(_pools_doc(("gpu1:0", "a:1", ["m:1", "*"], {}), ("gpu1:1", "a:2", ["m:1", "*"], {"down": True})))
    assert view["gpu1:0"]["last"] == ["m:1", "*"]


def test_cluster_state_sums_the_gateways_and_tells_progress_from_stall():
    gw1 = g.pools_view(_pools_doc(("h:0", "a:1", ["m", "*"], {"inflight": 2, "progress_age": 0.4}),
                                  ("h:1", "a:2", ["m", "*"], {"inflight": 1, "progress_age": 45.0, "drained": True})))
    gw2 = g.metrics_view('herd_guard_gateway_inflight{server="h:0"} 1\nherd_guard_gateway_drained{server="h:0"} 1\n'
                         'herd_guard_gateway_progress_age_seconds{server="h:0"} 3.5\n'
                         'herd_guard_gateway_last_in_pool{server="h:1"} 1\n')
    s0 = g.cluster_state("h:0", {"gw1": gw1, "gw2": gw2, "gw3": None}, 30)
    assert s0["inflight"] == 3 and s0["progressing"] == ["gw1", "gw2"] and s0["stalled"] == []
    assert s0["waiting"] == ["gw1"] and s0["unknown"] == ["gw3"] and s0["age"] == 0.4
    assert g.restart_blockers(s0) == ["no answer from gateway gw3", "requests in flight make progress through gw1, gw2",
                                      "not drained yet on gw1"]
    s1 = g.cluster_state("h:1", {"gw1": gw1, "gw2": gw2}, 30)
    assert s1["stalled"] == [("gw1", 45.0, 1)] and s1["waiting"] == [] and g.restart_blockers(s1) == []


def test_a_gateway_guard_publishes_its_gateways_view_for_the_others(tmp_path):
    doc = _pools_doc(("h:0", "a:1", ["m", "*"], {"inflight": 2, "progress_age": 1.5}), ('we"ird:1', "a:2", ["*"], {}))
    guard = g.Guard(_config(tmp_path, host="gw1", gateway=_gateway(tmp_path)), fetch=lambda url, _t: g.pools_view(doc))
    own = guard.gateway_views()["gw1"]
    back = g.metrics_view(guard.metrics())
    for key in own:
        assert back[key]["inflight"] == own[key]["inflight"] and back[key]["drained"] == own[key]["drained"]
        assert back[key]["age"] == own[key]["age"] and bool(back[key]["last"]) == bool(own[key]["last"])
    assert 'herd_guard_gateway_up{gateway="gw1"} 1' in guard.metrics()


@pytest.mark.parametrize("bad", [{"failures": 0}, {"interval": 0}, {"port": 70000}, {"local": None, "gateway": None},
                                 {"stall_seconds": 0}, {"restart_max_per_hour": 0}, {"peers": ["ftp://x"]},
                                 {"gateway": {"pools_url": "/herd/pools", "drain_command": "/c", "state_file": "/s"}},
                                 {"gateway": {"pools_url": "http://127.0.0.1/herd/pools", "drain_command": "c", "state_file": "/s"}}])
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


def _gateway(tmp_path):
    return {"pools_url": "http://127.0.0.1:1/herd/pools", "drain_command": "/usr/local/sbin/herd-gateway-drain",
            "state_file": str(tmp_path / "guard.json")}


class _FakeGateway:
    """The gateway of a gateway guard: its /herd/pools view, and the drain command that changes it (as
    herd-gateway-drain and the admin location do)."""

    def __init__(self, instances, rc=0):
        self.doc = _pools_doc(*instances)
        self.calls, self.rc = [], rc

    def fetch(self, _url, _timeout):
        return g.pools_view(json.loads(json.dumps(self.doc)))

    def run(self, argv, **_kw):
        self.calls.append(list(argv))
        if self.rc == 0 and len(argv) == 3:
            for inst in self.doc["instances"]:
                if inst["key"] == argv[2]:
                    inst["drained"] = inst["down"] = argv[1] == "drain"
        return subprocess.CompletedProcess(argv, self.rc, "", "" if self.rc == 0 else "unknown target")

    def set(self, key, **fields):
        next(i for i in self.doc["instances"] if i["key"] == key).update(fields)


def _two(good, bad, pools=(["herd-tiny:1b", "*"], ["herd-tiny:1b", "*"]), **extra):
    return [("gpu1:0", good.split("//")[1], pools[0], {}), ("gpu1:1", bad.split("//")[1], pools[1], extra)]


def _gw_guard(tmp_path, fake, **over):
    return g.Guard(_config(tmp_path, host="gw1", gateway=_gateway(tmp_path), **over), run=fake.run, fetch=fake.fetch)


def _rounds(guard, n):
    for _ in range(n):
        guard.views_at = None  # a new round reads the gateway again
        guard.gateway_round()


DRAIN = "/usr/local/sbin/herd-gateway-drain"


def test_gateway_drains_after_k_failures_and_undrains_after_passes(tmp_path, server, hung):
    good = server(_Instance)
    fake = _FakeGateway(_two(good, hung))
    guard = _gw_guard(tmp_path, fake)
    _rounds(guard, 2)
    assert fake.calls == []
    _rounds(guard, 1)
    assert fake.calls == [[DRAIN, "drain", "gpu1:1"]]
    assert json.loads((tmp_path / "guard.json").read_text()) == ["gpu1:1"]
    assert 'herd_guard_actions_total{server="gpu1:1",action="drain"} 1' in guard.metrics()
    # The instance answers again: undrained after `passes` good rounds.
    fake.set("gpu1:1", endpoint=good.split("//")[1])
    guard.targets["gpu1:1"].base = good
    _rounds(guard, 1)
    assert len(fake.calls) == 1
    _rounds(guard, 1)
    assert fake.calls[-1] == [DRAIN, "undrain", "gpu1:1"]
    assert json.loads((tmp_path / "guard.json").read_text()) == []
    # A new guard starts from the saved record.
    assert g.Guard(guard.config, run=fake.run).drained == set()


def test_gateway_keeps_the_last_healthy_instance_and_leaves_operator_drains(tmp_path, server, hung):
    good = server(_Instance)
    # gpu1:0 is drained by an operator (rolling deploy): gpu1:1, hung, is the last one of the pool.
    fake = _FakeGateway(_two(good, hung))
    fake.set("gpu1:0", drained=True, down=True)
    guard = _gw_guard(tmp_path, fake)
    _rounds(guard, 4)
    assert fake.calls == []
    assert 'herd_guard_actions_total{server="gpu1:1",action="drain_refused"} 1' in guard.metrics()


def test_only_instance_of_a_model_is_never_drained(tmp_path, server, hung):
    """ollama_models: [{name: big, instances: [0]}] on a 2-GPU host: instance 1 has no model list, so by the
    gateway's rule it is in pool "*" only; instance 0, the only one of `big`, hangs: it stays in rotation.
    (The guard that derived membership itself put instance 1 in every pool and drained instance 0.)"""
    fake = _FakeGateway(_two(server(_Instance), hung, pools=(["*"], ["big:latest", "*"])))
    guard = _gw_guard(tmp_path, fake)
    _rounds(guard, 5)
    assert fake.calls == [] and guard.drained == set()
    assert guard.targets["gpu1:1"].failed >= 3
    assert 'herd_guard_actions_total{server="gpu1:1",action="drain_refused"} 1' in guard.metrics()


def test_failed_drain_is_counted_and_retried(tmp_path, server, hung):
    fake = _FakeGateway(_two(server(_Instance), hung), rc=1)
    guard = _gw_guard(tmp_path, fake)
    _rounds(guard, 4)
    assert len(fake.calls) == 2 and guard.drained == set()
    assert 'action="drain_failed"} 2' in guard.metrics()


class _Queued(_Instance):
    """Answers /api/ps at once; a generate waits behind the clients' long answers (longer than any canary)."""
    started = 0

    def do_POST(self):  # noqa: N802
        _Queued.started += 1
        time.sleep(1.5)
        try:
            self._json(200, {"done": True})
        except OSError:
            pass


def test_busy_instance_gets_no_canary_and_is_never_drained(tmp_path, server):
    """Every slot busy through the gateway, tokens flowing: no canary competes with the clients, no failure."""
    base = server(_Queued)
    fake = _FakeGateway(_two(base, base, inflight=4, progress_age=0.3))
    fake.set("gpu1:0", inflight=4, progress_age=0.2)
    guard = _gw_guard(tmp_path, fake, canary_timeout=0.3)
    _Queued.started = 0
    _rounds(guard, 6)
    assert _Queued.started == 0 and fake.calls == []
    assert all(t.failed == 0 for t in guard.targets.values())


def test_canary_that_queued_while_tokens_flowed_is_busy_not_failed(tmp_path, server):
    """A free slot when the canary started, taken by a client before it: the canary times out while the gateway
    sees bytes flowing, so it is busy. Without progress the same timeout is a failure (as before)."""
    base = server(_Queued)
    cfg = _config(tmp_path, canary_timeout=0.3)
    flowing = {"inflight": 1, "progressing": ["gw1"], "stalled": [], "waiting": [], "unknown": [], "age": 0.1}
    target = g.Target("gpu1:0", base, [MODEL], cfg, num_parallel=2)
    for _ in range(8):
        target.round(flowing)
        time.sleep(0.15)
    assert target.failed == 0 and target.counts["busy"] >= 2 and target.counts["fail"] == 0
    idle = dict(flowing, inflight=0, progressing=[], age=None)
    target = g.Target("gpu1:1", base, [MODEL], cfg, num_parallel=2)
    for _ in range(8):
        target.round(idle)
        time.sleep(0.15)
    assert target.failed >= 2 and target.counts["fail"] >= 2


def test_stalled_instance_is_drained_at_once(tmp_path, server):
    """Requests in flight, no byte for stall_seconds: hung, though /api/ps answers and no canary can run."""
    good = server(_Instance)
    fake = _FakeGateway(_two(good, good, inflight=4, progress_age=3.0))
    guard = _gw_guard(tmp_path, fake, stall_seconds=10)
    _rounds(guard, 3)
    assert fake.calls == []
    fake.set("gpu1:1", progress_age=12.0)
    _rounds(guard, 1)
    assert fake.calls == [[DRAIN, "drain", "gpu1:1"]]
    assert "produced no byte for 12 s" in guard.targets["gpu1:1"].why


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
    assert guard.maybe_restart(target, inst, None)
    assert run.calls == [["systemctl", "restart", "ollama@1.service"]]
    assert target.failed == 0
    # At most one restart per restart_interval.
    assert not guard.maybe_restart(target, inst, None)
    assert len(run.calls) == 1
    m = guard.metrics()
    assert 'herd_guard_actions_total{server="gpu1:1",action="restart"} 1' in m
    assert "herd_guard_restarts_last_hour 1" in m and "herd_guard_restart_capped 0" in m


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _local_guard(tmp_path, server, n=2, **over):
    insts = [{"id": i, "port": 1, "local_url": server(_Instance), "models": [MODEL], "num_parallel": 2,
              "unit": f"ollama@{i}.service", "container": f"herd-ollama-{i}"} for i in range(n)]
    run, clock = _Run(), _Clock()
    guard = g.Guard(_config(tmp_path, local={"mode": "systemd", "instances": insts}, **over), run=run, clock=clock,
                    sleep=lambda _s: None)
    return guard, run, clock, guard.local_targets()


def test_restart_waits_for_the_gateways(tmp_path, server):
    """Not before every gateway drained it (or keeps it as a pool's last) and no request on it makes progress."""
    guard, run, _clock, [(target, inst), _other] = _local_guard(tmp_path, server)
    serving = {"inflight": 2, "progressing": ["gw1"], "stalled": [], "waiting": ["gw2"], "unknown": [], "age": 1.0}
    assert not guard.maybe_restart(target, inst, serving)
    assert not guard.maybe_restart(target, inst, dict(serving, progressing=[]))
    assert not guard.maybe_restart(target, inst, dict(serving, progressing=[], waiting=[], unknown=["gw2"]))
    assert run.calls == []
    stalled = dict(serving, progressing=[], waiting=[], stalled=[("gw1", 40.0, 2)])
    assert guard.maybe_restart(target, inst, stalled)
    assert run.calls == [["systemctl", "restart", "ollama@0.service"]]


def test_restart_backoff_doubles_and_the_hourly_cap_stops_it(tmp_path, server, capsys):
    guard, run, clock, [(a, ia), (b, ib)] = _local_guard(tmp_path, server, restart_interval=60, restart_max_per_hour=3)
    assert guard.maybe_restart(a, ia, None)
    clock.now += 59
    assert not guard.maybe_restart(a, ia, None)  # backoff: 60 s after the first restart
    clock.now += 2
    assert guard.maybe_restart(a, ia, None)
    clock.now += 100
    assert not guard.maybe_restart(a, ia, None)  # 2 x 60 s after the second
    clock.now += 21
    assert guard.maybe_restart(a, ia, None)
    assert len(run.calls) == 3
    # The host's cap (3 an hour) is reached: no restart of any instance, said once in the journal and on /metrics.
    clock.now += 1000
    assert not guard.maybe_restart(b, ib, None) and not guard.maybe_restart(a, ia, None)
    assert len(run.calls) == 3 and "herd_guard_restart_capped 1" in guard.metrics()
    assert capsys.readouterr().out.count("restart cap reached") == 1
    clock.now += 3600
    assert guard.maybe_restart(b, ib, None) and "herd_guard_restart_capped 0" in guard.metrics()
    assert g.restart_wait([(0.0, "x"), (100.0, "x"), (50.0, "y")], 130.0, 60, "x") == 90.0


def test_one_restart_at_a_time_on_a_host(tmp_path, server):
    guard, run, _clock, [(a, ia), (b, ib)] = _local_guard(tmp_path, server)
    with guard.restarting:  # instance a is restarting (waiting until warm)
        assert not guard.maybe_restart(b, ib, None)
    assert run.calls == []
    assert guard.maybe_restart(b, ib, None)


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
