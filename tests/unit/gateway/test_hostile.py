"""Hostile and odd requests against the real nginx serving the role's rendered gateway, in front of two capturing
backends (instance A holds m1, instance B holds m2; forced options for m1: num_ctx 8192).

- The body as Ollama reads it (go_json.py: Go's case-insensitive members, last duplicate wins): a property test
  (hypothesis) generates bodies with case variants, duplicates and odd nesting; whatever the gateway forwards,
  decoded the Go way, names the routed model, carries the forced options and only allowed client options, and
  has no client keep_alive. A duplicated member the gateway reads (in any case) is refused 400.
- The endpoint allowlist: every other path, in any case and with any method, answers 404 without touching an
  instance; a known path with another method 405.
- A 1 MiB pathological model name is answered within 2x a normal 404 of the same size (one run, medians).
- Body limits per endpoint, checked on Content-Length before the body is read.
- The catalogue lists only models of the plan's pools; API keys match case-sensitively.
"""

import http.client
import json
import re
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import gateway_over, role_vars
from go_json import go_fold, go_map, loads, struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FORCED = {"num_ctx": 8192}
SAMPLING = set(role_vars()["_gateway_sampling_options"])
# Top-level members the gateway reads or rewrites (a duplicate of one, in any case, is refused).
WATCHED = ("model", "name", "keep_alive", "options", "stream", "messages", "prompt", "system", "instructions", "input",
           "tools", "prompt_cache_key", "metadata", "user")
KEY = "hostile-test-key-0123456789abcdefXYZ"


class Backend:
    """An instance stand-in that records every request and answers 200 (POST) or a model list (catalogue)."""

    def __init__(self, models, delay=0.0):
        self.requests = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, doc):
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's name
                backend.requests.append((self.command, self.path, b""))
                if self.path == "/api/tags":
                    return self._answer({"models": [{"name": m, "model": m} for m in models]})
                if self.path == "/v1/models":
                    return self._answer({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
                if self.path == "/api/ps":
                    return self._answer({"models": [{"name": m, "model": m} for m in models]})
                return self._answer({"version": "0.0.0"})

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                backend.requests.append((self.command, self.path, body))
                time.sleep(delay)
                return self._answer({"done": True})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _start(tmp_path, gw, delay=0.0, **overrides):
    a, b = Backend(["m1:latest", "stale:latest"], delay), Backend(["m2:latest"], delay)
    gateway = gateway_over(tmp_path, gw, [(a.port, 4, ["m1"]), (b.port, 4, ["m2"])],
                           **{"gateway_model_options": {"m1": FORCED}, **overrides})
    return a, b, gateway


@pytest.fixture(scope="module")
def stack(tmp_path_factory, gw):
    a, b, gateway = _start(tmp_path_factory.mktemp("hostile"), gw)
    yield a, b, gateway
    gateway.stop()
    a.stop()
    b.stop()


def send(port, method, path, body=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body.encode() if isinstance(body, str) else body
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------- the body as Ollama reads it


def _variants(name):
    """Spellings of a member name Go matches to the field `name`."""
    out = [name, name.upper(), name.capitalize(), name[:-1] + name[-1].upper()]
    if "k" in name:
        out.append(name.replace("k", "\u212a", 1))
    if "s" in name:
        out.append(name.replace("s", "\u017f", 1))
    return out


def _key_text(name, escape):
    if escape and name:
        return f'"\\u{ord(name[0]):04x}' + json.dumps(name[1:])[1:]
    return json.dumps(name)


def _object_text(members, escapes):
    parts = []
    for (name, value), escape in zip(members, escapes, strict=False):
        value_text = value if isinstance(value, Raw) else json.dumps(value)
        parts.append(f"{_key_text(name, escape)}:{value_text}")
    return "{" + ", ".join(parts) + "}"


class Raw(str):
    """JSON text kept as written (an object with duplicate members)."""


MODEL_VALUES = ["m1", "M1", "library/m1", "m1:latest", "registry.ollama.ai/library/M1:Latest", "m2", "M2:LATEST",
                "nope", "", "m1@sha256:00", 5, None, ["m1"], {"model": "m2"}]
OPTION_NAMES = ["num_ctx", "NUM_CTX", "Num_Ctx", "temperature", "num_gpu", "seed", "model", "keep_alive"]


@st.composite
def options_value(draw):
    kind = draw(st.sampled_from(["object", "object", "object", "null", "list", "string"]))
    if kind == "null":
        return None
    if kind == "list":
        return [1]
    if kind == "string":
        return "num_ctx=1"
    members = draw(st.lists(st.tuples(st.sampled_from(OPTION_NAMES), st.integers(0, 200000)), max_size=4))
    return Raw(_object_text(members, [False] * len(members)))


@st.composite
def body(draw):
    member = st.one_of(
        st.tuples(st.sampled_from(_variants("model")), st.sampled_from(MODEL_VALUES)),
        st.tuples(st.sampled_from(_variants("keep_alive")), st.sampled_from([0, -1, "5m", None, "0s"])),
        st.tuples(st.sampled_from(_variants("options")), options_value()),
        st.tuples(st.sampled_from(_variants("stream")), st.booleans()),
        st.tuples(st.sampled_from(["prompt", "messages", "system", "x", "Model_", "modell", "keep-alive"]),
                  st.sampled_from(["hi", [{"role": "user", "content": "x", "MODEL": "m2", "keep_alive": 0}],
                                   {"model": "m2", "options": {"num_ctx": 1}, "keep_alive": 0}, [[[{"a": [1]}]]]])),
    )
    model = st.tuples(st.sampled_from(_variants("model")), st.sampled_from(MODEL_VALUES[:8]))
    members = draw(st.lists(member, max_size=6))
    members.insert(draw(st.integers(0, len(members))), draw(model))
    escapes = draw(st.lists(st.booleans(), min_size=len(members), max_size=len(members)))
    return _object_text(members, escapes)


def expected_outcome(gw, text):
    """What the gateway must do with this body, from Ollama's (Go's) reading of it: 400, 404, or a pool name."""
    doc = loads(text)
    counts = {}
    for name, _value in doc:
        folded = go_fold(name)
        counts[folded] = counts.get(folded, 0) + 1
    if any(counts.get(f, 0) > 1 for f in WATCHED):
        return 400
    top = struct(doc, WATCHED)
    model = top.get("model")
    if not isinstance(model, str) or model == "":
        return 400
    key = gw.gateway_model_key(model)
    if key not in ("m1:latest", "m2:latest"):
        return 404
    options = top.get("options")
    if options is not None:
        if not isinstance(options, type(doc)):
            return 400
        seen = [go_fold(name) for name, _value in options]
        if len(seen) != len(set(seen)):
            return 400
    return key


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=body(), path=st.sampled_from(["/api/generate", "/api/chat"]))
def test_what_the_gateway_forwards_is_what_it_routed(stack, gw, text, path):
    a, b, gateway = stack
    before = (len(a.requests), len(b.requests))
    status, answer = send(gateway.port, "POST", path, text)
    want = expected_outcome(gw, text)
    if want in (400, 404):
        assert status == want, (text, status, answer)
        assert (len(a.requests), len(b.requests)) == before, "a refused request reached an instance"
        return
    assert status == 200, (text, status, answer)
    backend = a if want == "m1:latest" else b
    assert len(backend.requests) == before[0 if backend is a else 1] + 1, (text, "went to the wrong instance")
    forwarded = backend.requests[-1][2].decode()
    top = struct(loads(forwarded), WATCHED)
    assert gw.gateway_model_key(top["model"]) == want, (text, forwarded)
    assert "keep_alive" not in top, (text, forwarded)
    options = go_map(top.get("options"))
    assert set(options) <= SAMPLING | set(FORCED), (text, forwarded)
    if want == "m1:latest":
        assert options.get("num_ctx") == 8192, (text, forwarded)
    client = go_map(struct(loads(text), WATCHED).get("options"))
    for name, value in client.items():
        if name in SAMPLING:
            assert options.get(name) == value, (text, forwarded)


def test_measured_cases_of_the_issue(stack):
    a, b, gateway = stack
    port = gateway.port
    # Keep_Alive in another case is dropped like keep_alive.
    status, _ = send(port, "POST", "/api/generate", '{"model":"m1","prompt":"x","Keep_Alive":0}')
    assert status == 200 and b"eep_" not in a.requests[-1][2].lower()
    # Two options members: refused, with a message that says why.
    status, answer = send(port, "POST", "/api/generate",
                          '{"model":"m1","options":{"num_ctx":1},"OPTIONS":{"num_ctx":131072}}')
    assert status == 400 and b"options" in answer and b"twice" in answer
    # model and MODEL: refused (Ollama would run the last one).
    status, answer = send(port, "POST", "/api/generate", '{"model":"m1","MODEL":"m2"}')
    assert status == 400 and b"model" in answer
    # Not JSON, or not an object: 400 (never 500).
    for text in ('{"model":"m1"', '{"mod\\', '["m1"]', '"m1"', '{"model":"m1"} x', '{"a":1,}'):
        assert send(port, "POST", "/api/generate", text)[0] == 400, text
    # A lone MODEL names the pool Ollama will run.
    count = len(b.requests)
    status, _ = send(port, "POST", "/api/chat", '{"MODEL":"m2","messages":[]}')
    assert status == 200 and len(b.requests) == count + 1
    # Load-time client options are dropped, sampling ones kept, forced ones win.
    status, _ = send(port, "POST", "/api/generate",
                     '{"model":"m1","options":{"num_gpu":0,"num_ctx":4,"temperature":0.5,"Seed":9}}')
    assert status == 200 and json.loads(a.requests[-1][2])["options"] == {"temperature": 0.5, "num_ctx": 8192}
    # An option named twice (in any case) is refused like a member.
    status, answer = send(port, "POST", "/api/generate", '{"model":"m1","options":{"num_ctx":4,"NUM_CTX":9}}')
    assert status == 400 and b"twice" in answer


# ------------------------------------------------------------------------------- endpoint allowlist


NOT_FORWARDED = [("POST", "/API/pull"), ("POST", "/api/Pull"), ("POST", "/api/signout"), ("POST", "/api/me"),
                 ("GET", "/api/admin"), ("GET", "/debug/pprof/"), ("GET", "/api/status"),
                 ("DELETE", "/api/user/keys/x"), ("POST", "/api/experimental/web_search"),
                 ("POST", "/v1/audio/transcriptions"), ("POST", "/api/generate/"), ("POST", "/API/GENERATE"),
                 ("GET", "/v1/models/a/b"), ("PUT", "/x"), ("GET", "/api/tags/../pull")]


def test_only_the_allowlisted_endpoints_reach_an_instance(stack):
    a, b, gateway = stack
    before = (len(a.requests), len(b.requests))
    for method, path in NOT_FORWARDED:
        status, answer = send(gateway.port, method, path, '{"model":"m1"}' if method != "GET" else None)
        assert status in (403, 404), (method, path, status)
        if status == 404:
            assert json.loads(answer)["error"], answer  # Ollama's error shape
    for method, path in [("GET", "/api/generate"), ("DELETE", "/api/chat"), ("POST", "/api/version"), ("PROPFIND", "/")]:
        status, _ = send(gateway.port, method, path, "{}" if method != "GET" else None)
        assert status == 405, (method, path, status)
    assert (len(a.requests), len(b.requests)) == before
    # The allowed ones still go through.
    assert send(gateway.port, "GET", "/api/version")[0] == 200
    assert send(gateway.port, "GET", "/v1/models/m2")[0] == 200 and b.requests[-1][1] == "/v1/models/m2"
    assert send(gateway.port, "GET", "/v1/models/unknown")[0] == 404


# ------------------------------------------------------------------------------- linear time, limits


def test_a_1_mib_pathological_name_is_answered_like_a_normal_404(stack):
    _a, _b, gateway = stack
    mib = 1024 * 1024
    bad = json.dumps({"model": "a" + " " * mib + "b", "prompt": "x"})
    normal = json.dumps({"model": "nope", "prompt": "x" * mib})
    times = {"bad": [], "normal": []}
    for _ in range(7):
        for kind, text in (("normal", normal), ("bad", bad)):
            start = time.perf_counter()
            status, answer = send(gateway.port, "POST", "/api/generate", text)
            times[kind].append(time.perf_counter() - start)
            assert status == 404 and len(answer) < 300, (kind, status, len(answer))
    ratio = statistics.median(times["bad"]) / statistics.median(times["normal"])
    print(f"1 MiB name vs normal 404 (medians of 7): {statistics.median(times['bad']) * 1000:.1f} ms / "
          f"{statistics.median(times['normal']) * 1000:.1f} ms = {ratio:.2f}")
    assert ratio < 2, times


def test_body_limits_per_endpoint_before_reading(stack):
    a, _b, gateway = stack
    # /api/show takes a name only: 64k; a larger Content-Length is refused before the body is read.
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.putrequest("POST", "/api/show")
    conn.putheader("Content-Length", str(200 * 1024))
    conn.endheaders()
    resp = conn.getresponse()  # answered without sending a byte of the body
    assert resp.status == 413 and b"65536 bytes" in resp.read()
    conn.close()
    count = len(a.requests)
    assert send(gateway.port, "POST", "/api/embed", json.dumps({"model": "m1", "input": "x" * (9 * 1024 * 1024)}))[0] == 413
    status, answer = send(gateway.port, "POST", "/api/generate", json.dumps({"model": "m1", "prompt": "x" * (17 * 1024 * 1024)}))
    assert status == 413 and "too large" in json.loads(answer)["error"]  # nginx's own limit, in Ollama's shape
    assert len(a.requests) == count


# ------------------------------------------------------------------------------- catalogue, keys


def test_the_catalogue_lists_only_the_plans_models(stack):
    _a, _b, gateway = stack
    status, answer = send(gateway.port, "GET", "/api/tags")
    assert status == 200 and [m["name"] for m in json.loads(answer)["models"]] == ["m1:latest", "m2:latest"]
    status, answer = send(gateway.port, "GET", "/v1/models")
    assert [m["id"] for m in json.loads(answer)["data"]] == ["m1:latest", "m2:latest"]
    status, answer = send(gateway.port, "GET", "/api/ps")
    ps = json.loads(answer)["models"]
    assert [m["name"] for m in ps] == ["m1:latest", "m2:latest"] and "herd_endpoint" not in ps[0]
    assert send(gateway.port, "POST", "/api/tags", "{}")[0] == 405


def test_keys_match_case_sensitively(tmp_path, gw):
    keys = gw.gateway_api_keys([{"name": "team-a", "key": KEY}])
    a, b, gateway = _start(tmp_path, gw, _gateway_keys=keys)
    try:
        body = '{"model":"m1","prompt":"x"}'
        assert send(gateway.port, "POST", "/api/generate", body)[0] == 401
        assert send(gateway.port, "POST", "/api/generate", body, {"Authorization": f"Bearer {KEY}"})[0] == 200
        assert send(gateway.port, "POST", "/api/generate", body, {"Authorization": f"bearer {KEY}"})[0] == 200
        assert send(gateway.port, "POST", "/api/generate", body, {"Authorization": f"Bearer {KEY.upper()}"})[0] == 401
        assert send(gateway.port, "POST", "/api/generate", body, {"Authorization": f"Bearer {KEY[:-1]}"})[0] == 401
        assert send(gateway.port, "GET", "/api/tags", None, {"Authorization": f"Bearer {KEY.lower()}"})[0] == 401
        assert len(a.requests) == 2  # "Bearer" and "bearer": the scheme has no case (RFC 9110), the key has
        log = (tmp_path / "herd-gateway.access.log").read_text()
        assert '"key":"team-a"' in log and KEY not in log
    finally:
        gateway.stop()
        a.stop()
        b.stop()


def _worker_peak_kib(gateway):
    """Peak resident memory (VmHWM, KiB) of the gateway's nginx worker."""
    children = open(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children").read().split()
    status = open(f"/proc/{children[0]}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))


def test_bodies_held_at_once_stay_within_the_budget(tmp_path, gw):
    """gateway_body_memory 2m, bodies of 900 KiB to an instance that takes 1 s: two are held, the third is answered
    busy at once (no instance touched); once they end, the budget is free again. Also measures what one 16 MiB body
    costs the worker (peak RSS)."""
    a, b, gateway = _start(tmp_path, gw, delay=1.0, gateway_body_memory="2m")
    try:
        text = json.dumps({"model": "m1", "prompt": "x" * (900 * 1024)})
        results = []

        def one():
            results.append(send(gateway.port, "POST", "/api/generate", text, timeout=30)[0])

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join(30)
        assert sorted(results) == [200, 200, 503], results
        assert len(a.requests) == 2
        assert send(gateway.port, "POST", "/api/generate", text, timeout=30)[0] == 200
    finally:
        gateway.stop()
        a.stop()
        b.stop()


def test_memory_of_one_large_body(tmp_path, gw):
    a, b, gateway = _start(tmp_path, gw)
    try:
        send(gateway.port, "POST", "/api/generate", '{"model":"m1","prompt":"x"}')
        before = _worker_peak_kib(gateway)
        text = json.dumps({"model": "m1", "prompt": "x" * (15 * 1024 * 1024), "keep_alive": 0})
        assert send(gateway.port, "POST", "/api/generate", text, timeout=60)[0] == 200
        grown = (_worker_peak_kib(gateway) - before) / 1024
        print(f"one 15 MiB body (rewritten): worker peak RSS +{grown:.0f} MiB ({grown / 15:.1f}x)")
        # Measured 7.0x here (the body in nginx, its Lua copy, the decoded document, the scanned member, the
        # rewritten text, the new nginx buffer): transient, one parse at a time per worker.
        assert grown < 15 * 12, grown
        # The copies are freed once the request is admitted: a second body does not add its own copies to the peak
        # (kept, they would double it). Lua's collector may not yet have reclaimed every copy of the first when the
        # second arrives (measured once: +15 MiB on +105), hence a margin of 3 bodies, well under one body's copies.
        assert send(gateway.port, "POST", "/api/generate", text, timeout=60)[0] == 200
        again = (_worker_peak_kib(gateway) - before) / 1024
        print(f"after a second 15 MiB body: +{again:.0f} MiB")
        assert again < grown + 15 * 3, (grown, again)
    finally:
        gateway.stop()
        a.stop()
        b.stop()
