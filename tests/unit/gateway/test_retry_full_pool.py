"""A retry when the pool is full: a request whose instance closed the connection before any byte of an answer
(an instance restarted under it, as herd-guard does to a hung one) goes to another instance of its pool even when
that one has no free gateway slot: it waits in that instance's own queue (OLLAMA_MAX_QUEUE) instead of failing.
Found by the selfheal scenario: such a request got a bare 500 from the balancer.

Real nginx serving the role's rendered gateway (one worker), two loopback backends: `dead` reads a request and
closes the connection (no byte of an answer), `live` answers after a delay in threads of its own.
"""

import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import NGINX, Gateway, free_port, render

MODEL = "herd-tiny:1b"
CONF = "etc/nginx/conf.d/herd-gateway.conf.j2"
UP = {"name": "herd_ollama", "zone_size": "256k", "keepalive": 32, "drain": []}
HOLD = 2.0  # seconds the live backend takes for the request that fills its one slot


class _Live(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(HOLD if body.get("prompt") == "hold" else 0)
        raw = json.dumps({"model": body.get("model"), "response": "ok", "done": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


def _dead_backend(stop):
    """Accepts, reads what comes, closes: the instance died with the request in it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.2)

    def serve():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            try:
                conn.recv(65536)
            except OSError:
                pass
            conn.close()
        sock.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1]


def _server(key, port):
    return {"key": key, "host": key.split(":")[0], "name": key, "address": "127.0.0.1", "port": port,
            "endpoint": f"127.0.0.1:{port}", "num_parallel": 1, "max_conns": 1, "weight": 1, "backup": False,
            "models": [MODEL]}


def _generate(port, prompt):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("POST", "/api/generate", body=json.dumps({"model": MODEL, "prompt": prompt, "stream": False}))
        resp = conn.getresponse()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read()
    finally:
        conn.close()


def _gateway(tmp_path, servers):
    port = free_port()
    text = render(CONF, _gateway_upstream=UP, _gateway_keys=[], gateway_http_port=port, gateway_queue_timeout="10s")
    upstream = render("etc/nginx/herd/gateway-upstream.conf.j2", _gateway_servers=servers, _gateway_upstream=UP)
    return Gateway(tmp_path, port, text, {"/etc/nginx/herd/gateway-upstream.conf": upstream},
                   servers={"upstream": UP, "servers": servers})


@pytest.fixture
def backends():
    if NGINX is None:
        pytest.skip("nginx is not installed here")
    stop = threading.Event()
    live = ThreadingHTTPServer(("127.0.0.1", 0), _Live)
    threading.Thread(target=live.serve_forever, daemon=True).start()
    try:
        yield _dead_backend(stop), live.server_address[1]
    finally:
        stop.set()
        live.shutdown()


def test_a_retry_waits_in_a_full_instance_instead_of_failing(tmp_path, backends):
    dead, live = backends
    gateway = _gateway(tmp_path, [_server("a:0", dead), _server("b:0", live)])
    try:
        held = []
        holder = threading.Thread(target=lambda: held.append(_generate(gateway.port, "hold")))
        holder.start()
        time.sleep(0.5)  # the held request is on b:0 (a:0 failed it at once) and fills its one slot
        status, headers, raw = _generate(gateway.port, "retried")
        holder.join(20)
    finally:
        gateway.stop()
    assert status == 200, (status, raw, (tmp_path / "error.log").read_text()[-2000:])
    assert json.loads(raw)["response"] == "ok"
    assert headers["x-herd-upstream"] == f"127.0.0.1:{dead}, 127.0.0.1:{live}"
    assert held and held[0][0] == 200, held


def test_a_retry_with_no_other_instance_gets_ollamas_error_shape(tmp_path, backends):
    dead, _live = backends
    gateway = _gateway(tmp_path, [_server("a:0", dead)])
    try:
        status, headers, raw = _generate(gateway.port, "retried")
    finally:
        gateway.stop()
    assert status == 502, (status, raw)
    assert "error" in json.loads(raw), raw
    assert headers["x-herd-upstream"].startswith(f"127.0.0.1:{dead}")
