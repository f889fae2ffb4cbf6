"""What herd-guard reads from the gateway and how it drains (issue 25), inside the real nginx with the role's Lua:

- progress: the time of an instance's last upstream byte, kept while requests are in flight (one shared-dict
  write per instance and worker a second at most), published with membership, in flight, num_parallel and
  drained per instance in /herd/pools;
- the admin location /herd/admin/drained: loopback only, applies drained.json at once on every worker (4 workers,
  SO_REUSEPORT spreading fresh connections over them) without a reload; the record keeps the state across a
  reload; herd-gateway-drain uses it, and falls back to nginx -t + reload without it.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import NGINX, ROOT, free_port, gateway_config, render, run_lua

CONF = "etc/nginx/conf.d/herd-gateway.conf.j2"
DRAIN = os.path.join(ROOT, "roles", "gateway", "files", "herd-gateway-drain")
WORKERS = 4


# ------------------------------------------------------------------------------------- progress, in the slots

PROGRESS = r"""
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local cjson = require("cjson.safe")
local d = ngx.shared.herd_gateway
local record = {servers = {
    {key = "a:0", host = "a", address = "127.0.0.1", port = 1, endpoint = "127.0.0.1:1", max_conns = 2, models = {"m"}},
    {key = "a:1", host = "a", address = "127.0.0.1", port = 2, endpoint = "127.0.0.1:2", max_conns = 2, models = {}},
}}
settings.configure(settings.build({}, record, {}, function() return "127.0.0.1" end))
local out = {}
local a0 = settings.cfg.by_key["a:0"]
out.never = slots.progress_age(a0) == nil
-- The first request on an idle instance starts its clock.
slots.acquire("m:latest")
out.admitted = slots.progress_age(a0)
-- A second request on a busy instance does not: a stalled instance stays stalled while requests arrive.
d:set("t:a:0", ngx.now() - 30)
slots.acquire("m:latest")
out.second = slots.progress_age(a0)
-- A chunk is progress; more chunks within the second write nothing (one write per instance and worker a second).
slots.progress("a:0")
out.chunk = slots.progress_age(a0)
d:set("t:a:0", ngx.now() - 50)
for _ = 1, 10000 do
    slots.progress("a:0")
end
out.throttled = slots.progress_age(a0)
ngx.sleep(1.05)
ngx.update_time()
slots.progress("a:0")
out.next_second = slots.progress_age(a0)
-- Drained flags: by key and by host, followed by this worker's servers; the pool's candidates change with them.
local function pool()
    local keys = {}
    for _, c in ipairs(slots.candidates("*")) do keys[#keys + 1] = c.server.key end
    table.sort(keys)
    return keys
end
out.drained_key = slots.apply_drained({"a:0"})
slots.sync_drained()
out.pool_key = pool()
out.drained_host = slots.apply_drained({"a"})
slots.sync_drained()
out.pool_host = #pool()
slots.apply_drained({})
slots.sync_drained()
out.pool_none = pool()
ngx.say(cjson.encode(out))
"""


@pytest.fixture(scope="module")
def progress(tmp_path_factory):
    return run_lua(tmp_path_factory.mktemp("progress"), PROGRESS)


def test_progress_clock_starts_at_admission_and_follows_chunks(progress):
    assert progress["never"] is True
    assert progress["admitted"] < 0.5
    assert 29 < progress["second"] < 31
    assert progress["chunk"] < 0.5


def test_progress_writes_the_dict_at_most_once_a_second(progress):
    assert 49 < progress["throttled"] < 51  # 10000 chunks within the second: no write
    assert progress["next_second"] < 0.5


def test_drained_flags_by_key_and_by_host(progress):
    assert progress["drained_key"] == ["a:0"] and progress["pool_key"] == ["a:1"]
    assert progress["drained_host"] == ["a:0", "a:1"] and progress["pool_host"] == 0
    assert progress["pool_none"] == ["a:0", "a:1"]


# ------------------------------------------------------------------------------------- the real gateway

class _Instance(BaseHTTPRequestHandler):
    """An instance that streams: prompt "stream" = 6 chunks 0.5 s apart; "hang" = one chunk, then nothing for 4 s."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        self._send(b'{"version":"0.0.0"}')

    def do_POST(self):  # noqa: N802
        doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        plan = {"stream": [0.5] * 6, "hang": [4.0]}.get(doc.get("prompt"), [])
        try:
            self._chunk(b'{"response":"a","done":false}\n')
            for pause in plan:
                time.sleep(pause)
                self._chunk(b'{"response":"b","done":false}\n')
            self._chunk(b'{"done":true}\n')
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_a):
        pass


def _server(key, port, models):
    return {"key": key, "host": key.split(":")[0], "address": "127.0.0.1", "port": port,
            "endpoint": f"127.0.0.1:{port}", "name": "ollama", "num_parallel": 2, "max_conns": 4, "weight": 1, "backup": False,
            "models": models}


class _Stack:
    """Two stand-in instances (h:0 holds model m, h:1 holds nothing: pool "*" only) behind the rendered gateway
    with WORKERS workers, SO_REUSEPORT on its port."""

    def __init__(self, tmp_path):
        self.instances = []
        ports = []
        for _ in range(2):
            srv = ThreadingHTTPServer(("127.0.0.1", 0), _Instance)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            self.instances.append(srv)
            ports.append(srv.server_address[1])
        self.port = free_port()
        self.tmp = tmp_path
        up = {"name": "herd_ollama", "zone_size": "256k", "keepalive": 32, "drain": [],
              "loopback_url": f"http://127.0.0.1:{self.port}"}
        self.record = {"upstream": up, "servers": [_server("h:0", ports[0], ["m:latest"]), _server("h:1", ports[1], [])]}
        text = render(CONF, _gateway_upstream=up, _gateway_keys=[], gateway_http_port=self.port,
                      gateway_allow=["127.0.0.0/8"])
        text = text.replace(f"listen {self.port} default_server;", f"listen {self.port} default_server reuseport;")
        assert "reuseport" in text
        upstream = render("etc/nginx/herd/gateway-upstream.conf.j2", _gateway_servers=self.record["servers"],
                          _gateway_upstream=up)
        self.main = gateway_config(tmp_path, text, {"/etc/nginx/herd/gateway-upstream.conf": upstream},
                                   servers=self.record, drained=[])
        # Workers read drained.json at runtime: on a real gateway it is 0644 in a 0755 directory; here the test's
        # private temp directory is readable by its own user only, so the workers run as that user.
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.main.write_text(f"{user}worker_processes {WORKERS};\n" + self.main.read_text())
        self.state = tmp_path / "var/lib/herd/gateway"
        (tmp_path / "logs").mkdir(exist_ok=True)
        self.proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(self.main), "-g", "daemon off;"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while self.get("/herd/health")[0] != 200:
            assert time.monotonic() < deadline and self.proc.poll() is None, (tmp_path / "error.log").read_text()
            time.sleep(0.1)

    def request(self, method, path, body=None, source="127.0.0.1", timeout=10):
        """One request on a fresh connection (so that SO_REUSEPORT picks a worker for each)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout, source_address=(source, 0))
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.getheader("X-Herd-Upstream"), resp.read()
        except OSError as exc:
            return 0, None, str(exc).encode()
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path)

    def pools(self):
        status, _up, body = self.get("/herd/pools")
        assert status == 200, body
        return json.loads(body)

    def instances_by_key(self):
        return {i["key"]: i for i in self.pools()["instances"]}

    def workers(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return out.split()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        for srv in self.instances:
            srv.shutdown()
            srv.server_close()


@pytest.fixture
def stack(tmp_path):
    if NGINX is None:
        pytest.skip("nginx is not installed here")
    s = _Stack(tmp_path)
    yield s
    s.stop()


def test_pools_publish_membership_inflight_and_progress(stack):
    assert len(stack.workers()) == WORKERS
    inst = stack.instances_by_key()
    # The gateway's own membership: an instance without models is in pool "*" only.
    assert inst["h:0"]["pools"] == ["m:latest", "*"] and inst["h:1"]["pools"] == ["*"]
    assert inst["h:0"]["num_parallel"] == 2 and inst["h:0"]["max_conns"] == 4 and inst["h:0"]["drained"] is False
    assert "progress_age" not in inst["h:0"]
    results = {}

    def ask(prompt):
        results[prompt] = stack.request("POST", "/api/generate", {"model": "m", "prompt": prompt})

    streaming = threading.Thread(target=ask, args=("stream",))
    streaming.start()
    ages = []
    for _ in range(5):
        time.sleep(0.5)
        ages.append(stack.instances_by_key()["h:0"])
    streaming.join(10)
    assert results["stream"][0] == 200
    assert all(a["inflight"] == 1 for a in ages), ages
    # Tokens flowing: the last byte is never older than the chunk interval plus the one-second write limit.
    assert max(a["progress_age"] for a in ages) < 1.6, ages
    hanging = threading.Thread(target=ask, args=("hang",))
    hanging.start()
    time.sleep(3)
    stalled = stack.instances_by_key()["h:0"]
    hanging.join(10)
    assert stalled["inflight"] == 1 and stalled["progress_age"] >= 2.5, stalled
    # The slot is given back when nginx finalizes the request (its log phase), a moment after the client's answer
    # ends: on a busy machine that moment comes after the client returns, so the check waits for it, bounded.
    deadline = time.monotonic() + 10
    while stack.instances_by_key()["h:0"]["inflight"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.instances_by_key()["h:0"]["inflight"] == 0


def _drain_record(stack, targets):
    (stack.state / "drained.json").write_text(json.dumps(targets))


def test_admin_drain_is_loopback_only_and_effective_on_every_worker_at_once(stack):
    _drain_record(stack, ["h:0"])
    # Only 127.0.0.1 (another loopback source address, allowed by gateway_allow here, is refused).
    assert stack.request("POST", "/herd/admin/drained", source="127.0.0.2")[0] == 403
    assert stack.request("GET", "/herd/admin/drained")[0] == 405
    assert all(i["drained"] is False for i in stack.instances_by_key().values())  # nothing applied yet
    status, _up, body = stack.request("POST", "/herd/admin/drained")
    assert status == 200 and json.loads(body) == {"drained": ["h:0"]}
    # 40 fresh connections, spread over the 4 workers by SO_REUSEPORT: every one sees h:0 drained at once and
    # routes around it (with the flag on one worker only, about 3 in 4 would not).
    pids = set(stack.workers())
    for _ in range(20):
        assert stack.instances_by_key()["h:0"]["drained"] is True
        status, upstream, _body = stack.request("GET", "/api/version")
        assert status == 200 and upstream == stack.record["servers"][1]["endpoint"], upstream
    assert set(stack.workers()) == pids  # no reload: the same workers
    # The record keeps the state across a reload (init reads drained.json).
    os.kill(stack.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while set(stack.workers()) & pids and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(stack.workers()) & pids
    assert all(stack.instances_by_key()["h:0"]["drained"] is True for _ in range(8))
    _drain_record(stack, [])
    assert json.loads(stack.request("POST", "/herd/admin/drained")[2]) == {"drained": []}
    assert all(stack.instances_by_key()["h:0"]["drained"] is False for _ in range(20))


def test_drain_command_applies_at_runtime_and_falls_back_to_a_reload(stack, tmp_path):
    fake_nginx = tmp_path / "fake-nginx"
    calls = tmp_path / "nginx-calls"
    fake_nginx.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake_nginx.chmod(0o755)
    env = dict(os.environ, HERD_GATEWAY_STATE_DIR=str(stack.state), HERD_NGINX_BIN=str(fake_nginx))

    def drain(*args):
        done = subprocess.run([sys.executable, DRAIN, *args], capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    out = drain("drain", "h:0")
    assert out["applied"] == "runtime" and out["drained"] == ["h:0"]
    assert not calls.exists()  # no nginx -t, no reload
    assert all(stack.instances_by_key()["h:0"]["drained"] is True for _ in range(8))
    assert drain("undrain", "h")["applied"] == "runtime"
    assert all(stack.instances_by_key()["h:0"]["drained"] is False for _ in range(8))
    # A gateway without the admin location: the record, then nginx -t and a reload (as before).
    record = dict(stack.record, upstream=dict(stack.record["upstream"], loopback_url=f"http://127.0.0.1:{free_port()}"))
    (stack.state / "servers.json").write_text(json.dumps(record))
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("the fallback reloads through systemctl on a systemd host")
    assert drain("drain", "h:1")["applied"] == "reload"
    assert calls.read_text().splitlines() == ["-t -q", "-s reload"]


def test_free_port_of_loopback_alias_is_bindable():
    """127.0.0.2 (used above as a non-127.0.0.1 source) is a loopback address on Linux."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.2", 0))
    finally:
        sock.close()
