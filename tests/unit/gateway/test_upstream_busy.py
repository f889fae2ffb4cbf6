"""An instance's own queue overflow through the gateway: the REAL Ollama server (0.3.6, lab/build/real, the
release-shaped archive `make lab-artifacts` builds) with OLLAMA_NUM_PARALLEL=1 and OLLAMA_MAX_QUEUE=1 behind the
real nginx serving the role's rendered gateway, with gateway_queue_per_instance large enough that the gateway
lets a burst through to it. The instance's 503 ("server busy ... maximum pending requests exceeded") reaches the
client with its status and body unchanged and herd's Retry-After (gateway_retry_after); it is not retried.

The real binary cannot generate here (its runner needs an Intel GPU): the requests it lets in end with 500 when the
runner cannot start. That is expected; only the 503s are the point, and every answer must be one of the two.
"""

import concurrent.futures
import http.client
import json
import shutil
import threading

import pytest
from conftest import Gateway, free_port, render
from ollama_process import REAL_ARCHIVE as ARCHIVE
from ollama_process import REAL_STORE as STORE
from ollama_process import OllamaProcess, unpack_real_release

ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
CONF = "etc/nginx/conf.d/herd-gateway.conf.j2"
UP = {"name": "herd_ollama", "zone_size": "256k", "keepalive": 32, "drain": []}
RETRY_AFTER = 7  # not the default (2): the header must be the configured one
QUEUE_PER_INSTANCE = 7  # max_conns = 1 + 7: the whole burst of 8 reaches the instance at once
BURST = 8
BURSTS_MAX = 3  # the instance fails its admitted requests within milliseconds: a slow burst may miss the overflow


class RealOllama(OllamaProcess):
    """The real `ollama serve` with a copy of the lab store (tests/unit/ollama_process.py)."""

    def __init__(self, workdir, extra_env):
        binary = unpack_real_release(workdir / "release")
        shutil.copytree(STORE, workdir / "models")
        super().__init__([str(binary)], workdir, workdir / "models", extra_env)


def request(port, method, path, body=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body.encode() if body is not None else None)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, gw):
    if not ARCHIVE.is_file() or not STORE.is_dir():
        pytest.fail(f"{ARCHIVE} or {STORE} is missing: run `make lab-artifacts`")
    base = tmp_path_factory.mktemp("upstream-busy")
    (base / "ollama").mkdir()
    ollama = RealOllama(base / "ollama", {"OLLAMA_NUM_PARALLEL": "1", "OLLAMA_MAX_QUEUE": "1"})
    gateway = None
    try:
        # The servers record from the role's own filter, on the plan role ollama would publish for this instance.
        plan = [{"id": 0, "port": ollama.port, "num_parallel": 1, "local_url": f"http://127.0.0.1:{ollama.port}",
                 "endpoint": f"127.0.0.1:{ollama.port}", "bind_address": "127.0.0.1", "loopback_only": True,
                 "models": ["herd-real-tiny"]}]
        servers = gw.gateway_servers(["h"], {"h": {"ollama_instances": plan}}, "h",
                                     queue_per_instance=QUEUE_PER_INSTANCE)
        assert [s["max_conns"] for s in servers] == [1 + QUEUE_PER_INSTANCE]
        port = free_port()
        text = render(CONF, _gateway_upstream=UP, _gateway_keys=[], gateway_http_port=port,
                      gateway_retry_after=RETRY_AFTER, gateway_queue_per_instance=QUEUE_PER_INSTANCE)
        upstream = render("etc/nginx/herd/gateway-upstream.conf.j2", _gateway_servers=servers, _gateway_upstream=UP)
        gateway = Gateway(base / "nginx", port, text, {"/etc/nginx/herd/gateway-upstream.conf": upstream},
                          servers={"upstream": UP, "servers": servers})
        yield ollama, gateway, base / "nginx"
    finally:
        if gateway:
            gateway.stop()
        ollama.stop()


def burst(port, path, body):
    start = threading.Barrier(BURST)

    def send(_index):
        start.wait(10)
        return request(port, "POST", path, body, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(send, range(BURST)))


def test_the_instances_503_reaches_the_client_with_herds_retry_after(stack):
    ollama, gateway, workdir = stack
    body = json.dumps({"model": "herd-real-tiny", "prompt": "hi", "stream": False})
    answers = []
    for _ in range(BURSTS_MAX):
        answers += burst(gateway.port, "/api/generate", body)
        if any(status == 503 for status, _h, _b in answers):
            break
    busy = [(headers, raw) for status, headers, raw in answers if status == 503]
    assert busy, [(status, raw) for status, _h, raw in answers]
    for headers, raw in busy:
        # Ollama's body, untouched; the instance answered it (not the gateway's own queue); herd's Retry-After.
        assert json.loads(raw) == {"error": ERR_MAX_QUEUE}
        assert headers["x-herd-upstream"] == f"127.0.0.1:{ollama.port}"
        assert headers["retry-after"] == str(RETRY_AFTER)
    # The requests the instance let in fail to start a runner here: 500, passed through without Retry-After.
    others = [(status, headers, raw) for status, headers, raw in answers if status != 503]
    assert all(status == 500 and "retry-after" not in headers for status, headers, _raw in others), others
    # One attempt each: a 503 is never sent on to another instance (proxy_next_upstream is error/timeout only), and
    # the gateway's own queue rejected nothing (every request was admitted to the instance).
    pools = json.loads(request(gateway.port, "GET", "/herd/pools")[2])["pools"]
    assert [(p["name"], p["admitted"], p["rejected_full"], p["rejected_timeout"]) for p in pools] == [
        ("herd-real-tiny:latest", len(answers), 0, 0)]
    log = [json.loads(line) for line in (workdir / "herd-gateway.access.log").read_text().splitlines()]
    busy_log = [entry for entry in log if entry["status"] == "503"]
    assert len(busy_log) == len(busy)
    assert all(entry["upstream_status"] == "503" and entry["pool"] == "herd-real-tiny:latest" for entry in busy_log)
    # The instance answered and stays live: nothing marked it failed.
    assert all(not instance["down"] for instance in pools[0]["instances"])


def test_answers_other_than_503_get_no_retry_after(stack):
    """The gateway's own 404 (a model no instance holds) and an instance's 200 pass the same header filter
    untouched."""
    ollama, gateway, _workdir = stack
    status, headers, raw = request(gateway.port, "POST", "/api/generate", json.dumps({"model": "nope"}))
    assert (status, json.loads(raw)) == (404, {"error": 'model "nope" not found, try pulling it first'})
    assert "retry-after" not in headers
    status, headers, _raw = request(gateway.port, "GET", "/api/version")
    assert status == 200 and "retry-after" not in headers
    assert headers["x-herd-upstream"] == f"127.0.0.1:{ollama.port}"


def test_catalogue_through_the_gateway(stack):
    """The same stack answers the catalogue paths (herd_gateway/catalogue.lua: the raw HTTP client, the merges,
    the canonical JSON) with the instance's models, 200 every time and the same text from the cache."""
    ollama, gateway, _workdir = stack
    answers = {}
    for path in ("/api/tags", "/v1/models", "/api/ps"):
        status, headers, raw = request(gateway.port, "GET", path)
        assert status == 200 and headers["content-type"].startswith("application/json"), (path, status, raw)
        answers[path] = json.loads(raw)
        assert request(gateway.port, "GET", path)[2] == raw, f"{path}: a second answer differs"
    assert [m["name"] for m in answers["/api/tags"]["models"]] == ["herd-real-tiny:latest"]
    assert answers["/v1/models"]["object"] == "list"
    assert [m["id"] for m in answers["/v1/models"]["data"]] == ["herd-real-tiny:latest"]
    assert answers["/api/ps"]["models"] == [] or all(
        m["herd_endpoint"] == f"127.0.0.1:{ollama.port}" for m in answers["/api/ps"]["models"])
