"""End-to-end runs of tools/herd_load.py against a tiny stdlib streaming server on loopback."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from herd_testing import load_module

TOOL = Path(__file__).resolve().parents[3] / "tools" / "herd_load.py"


def _load():
    return load_module("tools/herd_load.py", "herd_load")


hl = _load()

TOKEN_DELAY = 0.01


class FakeOllama(ThreadingHTTPServer):
    """Answers /api/generate, /api/chat and /v1/chat/completions token by token (chunked)."""

    daemon_threads = True

    def __init__(self, upstream=None, fail_first=0, fail_status=503):
        super().__init__(("127.0.0.1", 0), Handler)
        self.upstream = upstream
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.lock = threading.Lock()
        self.count = 0
        self.paths = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.count += 1
            n_req = srv.count
            srv.paths.append(self.path)
        if n_req <= srv.fail_first:
            msg = b'{"error":"server busy"}'
            self.send_response(srv.fail_status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        n = body.get("max_tokens") or body.get("options", {}).get("num_predict", 4)
        openai = self.path == "/v1/chat/completions"
        chat = self.path == "/api/chat"

        def piece(i):
            if openai:
                return b'data: {"choices":[{"index":0,"delta":{"content":"t%d "}}]}\n\n' % i
            if chat:
                return b'{"message":{"role":"assistant","content":"t%d "},"done":false}\n' % i
            return b'{"response":"t%d ","done":false}\n' % i

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if openai else "application/x-ndjson")
        if srv.upstream:
            self.send_header("X-Herd-Upstream", srv.upstream)
        if not body.get("stream", True):
            time.sleep(TOKEN_DELAY * n)
            text = "".join(f"t{i} " for i in range(n))
            if openai:
                obj = {"object": "chat.completion", "choices": [{"message": {"content": text}}],
                       "usage": {"completion_tokens": n}}
            elif chat:
                obj = {"message": {"content": text}, "done": True, "eval_count": n}
            else:
                obj = {"response": text, "done": True, "eval_count": n}
            data = json.dumps(obj).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(n):
            time.sleep(TOKEN_DELAY)
            self._chunk(piece(i))
        if openai:
            self._chunk(b'data: {"choices":[],"usage":{"completion_tokens":%d}}\n\n' % n)
            self._chunk(b"data: [DONE]\n\n")
        else:
            self._chunk(b'{"response":"","done":true,"eval_count":%d}\n' % n)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture
def server(request, run_server):
    return run_server(FakeOllama(**getattr(request, "param", {})))


def _cfg(url, **kw):
    base = dict(url=url, concurrency=4, requests=12, duration=30, mix=hl.parse_mix("t:8:5"), progress=0.0,
                timeout=10)
    base.update(kw)
    return hl.Config(**base)


@pytest.mark.parametrize("server", [{"upstream": "127.0.0.1:11434"}], indirect=True)
def test_streamed_generate_counts_tokens_and_ttft(server):
    result = hl.run(_cfg(server.url), out=sys.stderr)
    s = result["summary"]
    assert server.count == 12
    assert set(server.paths) == {"/api/generate"}
    assert (s["requests"], s["ok"], s["errors"]) == (12, 12, 0)
    assert s["output_tokens"] == 12 * 5
    for r in result["samples"]:
        assert r["tokens"] == 5
        assert r["ttft"] is not None and r["latency"] is not None
        assert TOKEN_DELAY * 0.5 < r["ttft"] < r["latency"]
        assert r["latency"] >= 5 * TOKEN_DELAY * 0.9
    assert list(result["by_upstream"]) == ["127.0.0.1:11434"]
    # 4 clients, 12 requests of ~50 ms each -> about 3 rounds, far less than 12 serial ones
    assert s["wall_s"] < 12 * 5 * TOKEN_DELAY


@pytest.mark.parametrize("api", ["chat", "openai"])
def test_other_apis_stream(server, api):
    result = hl.run(_cfg(server.url, api=api, requests=6))
    assert result["summary"]["ok"] == 6
    assert result["summary"]["output_tokens"] == 30
    assert all(r["ttft"] < r["latency"] for r in result["samples"])
    assert set(result["by_upstream"]) == {"unknown"}


@pytest.mark.parametrize("api", ["generate", "chat", "openai"])
def test_not_streamed(server, api):
    result = hl.run(_cfg(server.url, api=api, requests=4, stream=False))
    assert result["summary"]["ok"] == 4
    assert result["summary"]["output_tokens"] == 20
    assert all(r["ttft"] is None for r in result["samples"])


@pytest.mark.parametrize("server", [{"fail_first": 3}], indirect=True)
def test_errors_by_status(server):
    result = hl.run(_cfg(server.url, concurrency=1, requests=8))
    s = result["summary"]
    assert server.count == 8
    assert s["errors_by_status"] == {"http_503": 3}
    assert s["ok"] == 5


def test_connection_refused_is_an_error(server):
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    result = hl.run(_cfg(f"http://127.0.0.1:{port}", concurrency=1, requests=2))
    assert result["summary"]["errors_by_status"] == {"connect": 2}


def test_rate_mode_is_bounded_by_duration(server):
    t0 = time.monotonic()
    result = hl.run(_cfg(server.url, concurrency=None, rate=20.0, requests=1000, duration=1.0))
    elapsed = time.monotonic() - t0
    n = result["summary"]["requests"]
    assert server.count == n
    assert 5 <= n <= 60  # ~20 Poisson arrivals in one second
    assert elapsed < 5
    assert result["summary"]["ok"] == n


def test_cli_writes_json_and_markdown(server, tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    rc = hl.main(["--url", server.url, "--concurrency", "2", "--requests", "4", "--prompt-mix", "a:4:3",
                  "--json", str(out_json), "--markdown", str(out_md), "--progress", "0"])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert data["summary"]["ok"] == 4 and len(data["samples"]) == 4
    assert "| requests (ok / total) | 4 / 4 |" in out_md.read_text()
    assert "herd_load" in capsys.readouterr().out


def test_plot_only_when_matplotlib_is_there(server, tmp_path):
    result = hl.run(_cfg(server.url, requests=4))
    png = tmp_path / "r.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert hl.plot(result, str(png)) is False
        assert not png.exists()
    else:
        assert hl.plot(result, str(png)) is True
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
