"""Shared state that heals (issue 26 item 6), inside the real nginx with the role's Lua and config:

- a worker killed (SIGKILL) while it holds slots and queue places never runs its log phase; the counters are
  given back from its share within seconds, and new requests are admitted;
- the queue's per-request markers live in their own dict (herd_queue) and nothing in herd_gateway is ever
  evicted: a full dict answers 503 in Ollama's error shape and the counters stay exact;
- /herd/pools publishes every dict's capacity and free space.
"""

import http.client
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import NGINX, free_port, gateway_config, render

CONF = "etc/nginx/conf.d/herd-gateway.conf.j2"
RELEASE = threading.Event()


class _Instance(BaseHTTPRequestHandler):
    """An instance that answers prompt "hold" only once RELEASE is set (at most 20 s), anything else at once."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        self._send(b'{"version":"0.0.0"}')

    def do_POST(self):  # noqa: N802
        doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if doc.get("prompt") == "hold":
            RELEASE.wait(20)
        self._send(b'{"response":"ok","done":true}')

    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *_a):
        pass


# Test locations (gateway_extra_config): fill a dict with junk until it refuses any write; empty it again.
FILL = r"""
location = /fill { allow 127.0.0.1; deny all; content_by_lua_block {
    local d = ngx.shared[ngx.var.arg_dict]
    local n = 0
    -- Large entries first, then every smaller slab size down to a number under a short key: nothing fits after.
    for _, value in ipairs({string.rep("x", 200), string.rep("x", 50), 1}) do
        while d:safe_set("x:" .. n, value) do
            n = n + 1
        end
    end
    ngx.say(n)
} }
location = /empty { allow 127.0.0.1; deny all; content_by_lua_block {
    local d = ngx.shared[ngx.var.arg_dict]
    local n = 0
    for _, key in ipairs(d:get_keys(0)) do
        if key:sub(1, 2) == "x:" then d:delete(key); n = n + 1 end
    end
    d:flush_expired()
    ngx.say(n)
} }
"""


class Stack:
    """One stand-in instance (max_conns 1, models a and b) behind the rendered gateway with `workers` workers."""

    def __init__(self, tmp_path, workers):
        RELEASE.clear()
        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), _Instance)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        port = self.srv.server_address[1]
        self.port = free_port()
        up = {"name": "herd_ollama", "zone_size": "256k", "keepalive": 8, "drain": []}
        record = {"upstream": up, "servers": [
            {"key": "h:0", "host": "h", "address": "127.0.0.1", "port": port, "endpoint": f"127.0.0.1:{port}",
             "name": "ollama", "num_parallel": 1, "max_conns": 1, "weight": 1, "backup": False,
             "models": ["a:latest", "b:latest"]}]}
        text = render(CONF, _gateway_upstream=up, _gateway_keys=[], gateway_http_port=self.port,
                      gateway_allow=["127.0.0.0/8"], gateway_extra_config=FILL.strip().splitlines(),
                      gateway_queue_zone_size="128k", gateway_zone_size="128k")
        text = text.replace(f"listen {self.port} default_server;", f"listen {self.port} default_server reuseport;")
        upstream = render("etc/nginx/herd/gateway-upstream.conf.j2", _gateway_servers=record["servers"],
                          _gateway_upstream=up)
        self.main = gateway_config(tmp_path, text, {"/etc/nginx/herd/gateway-upstream.conf": upstream},
                                   servers=record, drained=[])
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.main.write_text(f"{user}worker_processes {workers};\n" + self.main.read_text())
        (tmp_path / "logs").mkdir(exist_ok=True)
        self.tmp = tmp_path
        import subprocess
        self.proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(self.main), "-g", "daemon off;"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while self.request("GET", "/herd/health")[0] != 200:
            assert time.monotonic() < deadline and self.proc.poll() is None, (tmp_path / "error.log").read_text()
            time.sleep(0.1)

    def request(self, method, path, body=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except OSError as exc:
            return 0, str(exc).encode()
        finally:
            conn.close()

    def pools(self):
        status, body = self.request("GET", "/herd/pools")
        assert status == 200, body
        return json.loads(body)

    def state(self):
        """(in flight on h:0, waiting in pool a, waiting in pool b)."""
        doc = self.pools()
        queued = {p["name"]: p["queued"] for p in doc["pools"]}
        return doc["instances"][0]["inflight"], queued["a:latest"], queued["b:latest"]

    def workers(self):
        import subprocess
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return sorted(int(p) for p in out.stdout.split())

    def stop(self):
        RELEASE.set()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def stack(tmp_path, request):
    if NGINX is None:
        pytest.skip("nginx is not installed here")
    s = Stack(tmp_path, getattr(request, "param", 1))
    yield s
    s.stop()


def wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def send(stack, results, index, model="a", prompt="hold"):
    results[index] = stack.request("POST", "/api/generate", {"model": model, "prompt": prompt, "stream": False})


def test_a_killed_worker_gives_back_its_slots_and_queue_places(stack):
    results = {}
    threads = [threading.Thread(target=send, args=(stack, results, i)) for i in range(3)]
    threads[0].start()
    assert wait_for(lambda: stack.state()[0] == 1, 5)
    for t in threads[1:]:
        t.start()
    # One request holds the instance's only slot, two wait in the queue: all in the one worker.
    assert wait_for(lambda: stack.state() == (1, 2, 0), 5), stack.state()
    (victim,) = stack.workers()
    started = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(10)
    assert [results[i][0] for i in range(3)] == [0, 0, 0]  # their connections died with the worker
    # The master starts a new worker; it finds the dead one's shares and gives them back.
    assert wait_for(lambda: stack.workers() and stack.workers() != [victim] and stack.state() == (0, 0, 0), 5), \
        stack.state()
    healed = time.monotonic() - started
    print(f"\nkilled worker {victim} holding 1 slot and 2 queue places: counters back to 0 after {healed:.2f} s")
    RELEASE.set()
    status, body = stack.request("POST", "/api/generate", {"model": "a", "prompt": "x", "stream": False}, timeout=10)
    assert status == 200, body
    assert stack.state() == (0, 0, 0)
    assert "died; its slots" in (stack.tmp / "error.log").read_text()


@pytest.mark.parametrize("stack", [2], indirect=True)
def test_killing_one_of_two_workers_keeps_the_other_workers_counts(stack):
    results = {}
    n = 8
    threads = [threading.Thread(target=send, args=(stack, results, i)) for i in range(n)]
    threads[0].start()
    assert wait_for(lambda: stack.state()[0] == 1, 5)
    for t in threads[1:]:
        t.start()
    assert wait_for(lambda: stack.state() == (1, n - 1, 0), 5), stack.state()
    victim = stack.workers()[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)
    died = sum(1 for i in range(n) if i in results and results[i][0] == 0)
    alive = n - died
    assert 0 < died, results
    # What the live worker holds is kept exactly: its slot or queue places, nothing of the dead one's.
    assert wait_for(lambda: sum(stack.state()) == alive, 5), (stack.state(), alive)
    RELEASE.set()
    for t in threads:
        t.join(20)
    assert sorted(results[i][0] for i in range(n)) == [0] * died + [200] * alive
    assert wait_for(lambda: stack.state() == (0, 0, 0), 5), stack.state()


def test_a_full_queue_dict_answers_503_and_the_counters_stay(stack):
    RELEASE.set()
    assert stack.request("POST", "/api/generate", {"model": "a", "prompt": "x", "stream": False})[0] == 200
    doc = stack.pools()
    dicts = {d["name"]: d for d in doc["dicts"]}
    assert set(dicts) == {"herd_gateway", "herd_queue", "herd_affinity"}
    assert all(0 < d["free_space"] <= d["capacity"] for d in dicts.values()), dicts
    status, body = stack.request("GET", "/fill?dict=herd_queue")
    assert status == 200 and int(body) > 0
    status, body = stack.request("POST", "/api/generate", {"model": "a", "prompt": "x", "stream": False})
    assert status == 503, body
    assert json.loads(body) == {"error": "server busy, please try again: the gateway's shared state is full"}
    assert stack.state() == (0, 0, 0)
    full = {d["name"]: d for d in stack.pools()["dicts"]}
    assert full["herd_queue"]["free_space"] < dicts["herd_queue"]["free_space"]
    stack.request("GET", "/empty?dict=herd_queue")
    assert stack.request("POST", "/api/generate", {"model": "a", "prompt": "x", "stream": False})[0] == 200


def test_a_full_gateway_dict_never_evicts_a_counter(stack):
    # One request of pool a holds the slot; then herd_gateway is filled to the last byte.
    results = {}
    holder = threading.Thread(target=send, args=(stack, results, 0))
    holder.start()
    assert wait_for(lambda: stack.state() == (1, 0, 0), 5)
    status, body = stack.request("GET", "/fill?dict=herd_gateway")
    filled = int(body)
    assert status == 200 and filled > 0
    # Every counter is still there: the slot is still taken, its pool's keys still count.
    assert stack.state() == (1, 0, 0)
    # Pool b has no queue keys yet: they cannot be created, so the request is refused cleanly.
    status, body = stack.request("POST", "/api/generate", {"model": "b", "prompt": "x", "stream": False})
    assert status == 503 and b"shared state is full" in body, body
    assert stack.state() == (1, 0, 0)
    RELEASE.set()
    holder.join(20)
    assert results[0][0] == 200
    assert stack.state() == (0, 0, 0)
    print(f"\nherd_gateway (128k) took {filled} junk entries before it was full; no counter was evicted")
    stack.request("GET", "/empty?dict=herd_gateway")
    assert stack.request("POST", "/api/generate", {"model": "b", "prompt": "x", "stream": False})[0] == 200
