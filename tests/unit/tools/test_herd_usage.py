"""tools/herd_usage.py against a stand-in of Prometheus's HTTP API (/api/v1/query, its JSON shape): the queries it
sends, the table it prints, and a clear error without a Prometheus or without herd's series."""

import http.server
import json
import socketserver
import urllib.parse

import pytest
from herd_testing import load_module

hu = load_module("tools/herd_usage.py", "herd_usage")

RESULTS = {
    "herd_gateway_key_requests_total": [
        ({"key": "team-a", "model": "qwen3:8b", "status": "200"}, "120"),
        ({"key": "team-a", "model": "qwen3:8b", "status": "429"}, "7.2"),
        ({"key": "team-a", "model": "qwen3:8b", "status": "503"}, "1"),
        ({"key": "none", "model": "llama3.2:latest", "status": "200"}, "3"),
    ],
    "herd_gateway_tokens_total": [
        ({"key": "team-a", "model": "qwen3:8b", "type": "prompt"}, "50000.4"),
        ({"key": "team-a", "model": "qwen3:8b", "type": "output"}, "9000"),
        ({"key": "none", "model": "llama3.2:latest", "type": "output"}, "33"),
    ],
}


class FakePrometheus(http.server.BaseHTTPRequestHandler):
    queries = []
    empty = False

    def do_GET(self):  # noqa: N802
        url = urllib.parse.urlparse(self.path)
        params = urllib.parse.parse_qs(url.query)
        expr = params["query"][0]
        FakePrometheus.queries.append((url.path, expr, params["time"][0]))
        metric = next(name for name in RESULTS if name in expr)
        result = [] if FakePrometheus.empty else [
            {"metric": labels, "value": [float(params["time"][0]), value]} for labels, value in RESULTS[metric]]
        body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


@pytest.fixture
def prometheus(run_server):
    FakePrometheus.queries, FakePrometheus.empty = [], False
    server = run_server(socketserver.ThreadingTCPServer(("127.0.0.1", 0), FakePrometheus))
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_the_table_per_key_and_model(prometheus, capsys):
    assert hu.main(["--prometheus", prometheus, "--period", "7d", "--at", "2026-12-01T00:00:00Z"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [q[0] for q in FakePrometheus.queries] == ["/api/v1/query"] * 2
    assert all("[7d]" in q[1] and q[2] == "1796083200.000" for q in FakePrometheus.queries)
    row = next(line for line in out if line.startswith("team-a"))
    assert row.split() == ["team-a", "qwen3:8b", "120", "7", "1", "50000", "9000"]
    assert out[-1].split() == ["all", "123", "7", "1", "50000", "9033"]


def test_json_rows(prometheus, capsys):
    assert hu.main(["--prometheus", prometheus, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0] == {"key": "none", "model": "llama3.2:latest", "requests": 3, "refused": 0, "failed": 0,
                       "prompt_tokens": 0, "output_tokens": 33}


def test_clear_errors(prometheus, capsys):
    assert hu.main(["--prometheus", "http://127.0.0.1:1", "--period", "1d"]) == 2
    assert "playbooks/monitoring.yml" in capsys.readouterr().err
    assert hu.main(["--prometheus", prometheus, "--period", "a week"]) == 2
    assert "--period 'a week' is not a Prometheus duration" in capsys.readouterr().err
    assert hu.main(["--prometheus", prometheus, "--at", "yesterday"]) == 2
    assert "--at 'yesterday' is not a time" in capsys.readouterr().err
    FakePrometheus.empty = True
    assert hu.main(["--prometheus", prometheus]) == 1
    assert "is it scraping the gateways' herd-exporter" in capsys.readouterr().err
