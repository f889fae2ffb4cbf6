"""herd-guard as a service (roles/guard/files/herd_guard.py on herd_service): its loops survive a round that raises,
systemd's watchdog is pinged only while every loop is live, /metrics answers while idle sockets are open (and they
hold no thread), IPv6 listen addresses work, and the real program tells systemd it is ready and pings it."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import herd_service as hs
import pytest
from herd_testing import load_module

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
PROGRAM = os.path.join(ROOT, "roles", "guard", "files", "herd_guard.py")
g = load_module(PROGRAM, "herd_guard_service")

MODEL = "herd-tiny:1b"


def _config(**over):
    cfg = {"host": "gpu1", "listen_address": "127.0.0.1", "port": 0, "interval": 0.05, "probe_timeout": 0.5,
           "canary_timeout": 0.5, "failures": 3, "restart_failures": 3, "passes": 2, "warm_timeout": 3,
           "restart_interval": 60, "stall_seconds": 30, "restart_max_per_hour": 6, "peers": [], "http_timeout": 1,
           "http_workers": 2, "http_max_connections": 256, "local": None, "gateway": None}
    cfg.update(over)
    return cfg


class _PsList(BaseHTTPRequestHandler):
    """An instance whose /api/ps answers a JSON list, not an object."""

    def do_GET(self):  # noqa: N802
        raw = b"[]"
        self.send_response(200)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_a):
        pass


@pytest.fixture
def instance(run_server):
    srv = run_server(ThreadingHTTPServer(("127.0.0.1", 0), _PsList))
    return f"http://127.0.0.1:{srv.server_address[1]}"


def _gateway(tmp_path):
    """A gateway duty whose /herd/pools is read through the Guard's fetch (see _view); nothing listens on port 1."""
    return {"pools_url": "http://127.0.0.1:1/herd/pools", "drain_command": "/bin/true",
            "state_file": str(tmp_path / "guard-state.json")}


def _view(holder):
    """A fetch that answers the gateway's view held in holder["view"] (as herd_guard.pools_view returns it)."""
    return lambda _url, _timeout: holder["view"]


def _instance_view(endpoint):
    return {"gpu1:0": {"endpoint": endpoint, "pools": ["*"], "inflight": 0, "max_conns": 2, "num_parallel": 1,
                       "drained": False, "down": False, "age": None, "last": []}}


def _wait(predicate, limit=5.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _errors(guard, loop):
    return next(x.errors for x in guard.loops if x.name == loop)


# ---------------------------------------------------------------------------------------------------------
# Loops survive their rounds


def test_rounds_that_raise_do_not_stop_the_loops(tmp_path, instance):
    """A gateway view the guard cannot use (an instance without its slot count) and a non-dict /api/ps raise in
    every round: both loops go on, count the errors, stay live, and work again once the input is good."""
    local = {"mode": "systemd", "instances": [{"id": 0, "port": 1, "local_url": instance, "models": [],
                                               "unit": "ollama@0.service", "container": "herd-ollama-0"}]}
    holder = {"view": _instance_view(instance.split("//")[1])}
    del holder["view"]["gpu1:0"]["num_parallel"]
    guard = g.Guard(_config(local=local, gateway=_gateway(tmp_path)), fetch=_view(holder))
    guard.start()
    try:
        assert _wait(lambda: _errors(guard, "gateway") >= 3 and _errors(guard, "local:gpu1:0") >= 3)
        assert guard.live() and all(loop.thread.is_alive() for loop in guard.loops)
        m = guard.metrics()
        assert "herd_guard_up 1\n" in m
        assert 'herd_guard_loop_up{loop="gateway"} 1' in m and 'herd_guard_loop_up{loop="local:gpu1:0"} 1' in m
        assert 'herd_guard_round_errors_total{loop="gateway"} ' in m and 'herd_guard_round_errors_total{loop="local:gpu1:0"} ' in m
        # Good input again: the gateway loop's rounds pass (its error count stops growing).
        holder["view"] = {}
        time.sleep(0.2)
        before = _errors(guard, "gateway")
        time.sleep(0.3)
        assert _errors(guard, "gateway") == before
    finally:
        guard.stop.set()


def test_a_probe_thread_that_raises_counts_for_the_gateway_loop(tmp_path, instance):
    """The gateway probes each server in a thread of its own: a non-dict /api/ps there is an error of its loop."""
    holder = {"view": _instance_view(instance.split("//")[1])}
    guard = g.Guard(_config(gateway=_gateway(tmp_path)), fetch=_view(holder))
    loop = hs.Loop("gateway", guard.gateway_round, 0.05, 60, guard.stop)
    assert loop.run_round() is True and loop.errors == 1
    assert loop.run_round() is True and loop.errors == 2


def test_a_thread_that_cannot_start_is_a_failed_round(tmp_path, monkeypatch):
    holder = {"view": _instance_view("127.0.0.1:9")}
    guard = g.Guard(_config(gateway=_gateway(tmp_path)), fetch=_view(holder))
    loop = hs.Loop("gateway", guard.gateway_round, 0.05, 60, guard.stop)

    def cannot_start(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", cannot_start)
    assert loop.run_round() is False
    monkeypatch.undo()
    assert loop.errors == 1 and loop.run_round() is True


# ---------------------------------------------------------------------------------------------------------
# systemd's watchdog


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(0.05)
    yield path, sock
    sock.close()


def _received(sock, seconds):
    """Messages received within `seconds`."""
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got.append(sock.recv(256).decode())
        except TimeoutError:
            pass
    return got


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watchdog_is_pinged_while_the_loops_live_and_not_once_one_died(tmp_path, notify_socket):
    path, sock = notify_socket
    guard = g.Guard(_config(gateway=_gateway(tmp_path)), fetch=_view({"view": {}}))
    guard.start()
    notify = lambda message: hs.sd_notify(message, {"NOTIFY_SOCKET": path})  # noqa: E731
    try:
        hs.Watchdog(guard.live, guard.stop, interval=0.05, notify=notify).start()
        got = _received(sock, 0.4)
        assert got[0] == "READY=1" and got.count("WATCHDOG=1") >= 3
        # The loop dies (an error its rounds do not catch ends its thread): no ping any more, and /metrics says so.
        loop = guard.loops[0]
        loop.round_fn = lambda: sys.exit(1)
        assert _wait(lambda: not loop.thread.is_alive())
        _received(sock, 0.1)  # a ping that was under way
        assert "WATCHDOG=1" not in _received(sock, 0.4)
        assert "herd_guard_up 0\n" in guard.metrics() and 'herd_guard_loop_up{loop="gateway"} 0' in guard.metrics()
    finally:
        guard.stop.set()


def test_a_stuck_round_is_not_live_until_it_beats():
    clock = [0.0]
    stop = threading.Event()
    entered, release = threading.Event(), threading.Event()

    def stuck():
        entered.set()
        release.wait(5)

    loop = hs.Loop("local:gpu1:0", stuck, 1, 10, stop, clock=lambda: clock[0])
    loop.start()
    try:
        assert entered.wait(2) and loop.live()
        clock[0] = 11.0
        assert not loop.live()
        loop.beat()  # a long command reports progress
        assert loop.live()
    finally:
        stop.set()
        release.set()


def test_watchdog_interval_is_half_of_watchdogsec():
    assert hs.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15
    assert hs.watchdog_interval({}) is None
    assert hs.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # for another process


def test_the_guard_tells_systemd_it_is_ready_and_pings_its_watchdog(tmp_path, notify_socket):
    """The program itself, as systemd starts it: READY=1 once /metrics listens, then WATCHDOG=1 pings."""
    path, sock = notify_socket
    config = tmp_path / "guard.json"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config.write_text("# Ansible managed\n" + json.dumps(_config(port=port, gateway=_gateway(tmp_path))))
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000",
               PYTHONPATH=os.path.dirname(hs.__file__))
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, PROGRAM, "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        got = _received(sock, 1.5)
        assert "READY=1" in got and got.count("WATCHDOG=1") >= 3, got
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            assert "herd_guard_up 1\n" in answer.read().decode()
    finally:
        proc.terminate()
        proc.wait(5)


# ---------------------------------------------------------------------------------------------------------
# /metrics


@pytest.fixture
def serving(run_server):
    def start(**over):
        guard = g.Guard(_config(**over, local={"mode": "systemd", "instances": []}))
        return run_server(g.serve(guard, guard.config))

    return start


def _get(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.status, answer.read().decode()


def test_metrics_answers_while_200_idle_sockets_are_open_and_they_hold_no_thread(serving):
    server = serving()
    port = server.server_address[1]
    assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200  # the workers exist
    threads = threading.active_count()
    idle = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            if i % 2:
                s.sendall(b"GET /metr")  # half a request line, never finished (slowloris)
            idle.append(s)
        time.sleep(0.1)
        started = time.monotonic()
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "herd_guard_up" in body
        assert time.monotonic() - started < 1
        assert threading.active_count() <= threads + 2, "idle sockets must not each hold a thread"
        # Idle clients are cut after http_timeout (1 s here).
        idle[0].settimeout(3)
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()


def test_metrics_server_closes_the_oldest_connection_beyond_its_limit(serving):
    server = serving(http_max_connections=10, http_timeout=30)
    port = server.server_address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(12)]
    try:
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        idle[0].settimeout(2)
        assert idle[0].recv(1) == b""
    finally:
        for s in idle:
            s.close()


def test_metrics_server_answers_404_and_refuses_other_methods(serving):
    port = serving().server_address[1]
    with pytest.raises(urllib.error.HTTPError) as err:
        _get(f"http://127.0.0.1:{port}/other")
    assert err.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=3)
    assert err.value.code == 405


def _ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 on this machine")
def test_ipv6_listen_addresses_work(serving):
    port = serving(listen_address="::1").server_address[1]
    assert _get(f"http://[::1]:{port}/metrics")[0] == 200
    # :: listens on every address of both families.
    port = serving(listen_address="::").server_address[1]
    assert _get(f"http://[::1]:{port}/metrics")[0] == 200
    assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200


@pytest.mark.parametrize("address", ["localhost", "0.0.0.0.0", "::g", ""])
def test_check_config_refuses_a_listen_address_that_is_no_ip_address(address):
    with pytest.raises(ValueError, match="listen_address"):
        g.check_config(_config(listen_address=address, local={"mode": "systemd", "instances": []}))
