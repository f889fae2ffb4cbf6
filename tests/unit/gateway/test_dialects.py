"""Every endpoint of the table in its API's dialect (issue 29), against the real nginx serving the role's rendered
gateway in front of two recording backends (test_hostile.Backend): instance A holds m1 and m3, instance B holds m2
and m3.

- Routing: every endpoint that names a model reaches an instance of that model's pool (a request for m2 never
  reaches A), whatever its dialect.
- The gateway's own answers (400, 404, 413, 401, 429, 503, 502) in the endpoint's error shape: Ollama's
  {"error": text}, OpenAI's {"error": {message, type, param, code}}, Anthropic's {"type": "error", "error": {type,
  message}}, with the types Ollama's own compatibility layers use; busy and rate-limited answers carry Retry-After.
- Conversation affinity for agents: the session identifiers agents send (headers, prompt_cache_key,
  metadata.user_id, user) and the stable prefix of /v1/messages and /v1/responses keep a conversation on its
  instance.
"""

import http.client
import json
import threading
import time

import pytest
from conftest import gateway_over, role_vars, run_lua
from test_hostile import Backend

KEY = "dialect-test-key-0123456789abcdefXYZ"
ENDPOINTS = role_vars()["_gateway_endpoints"]
MODEL_ENDPOINTS = [e for e in ENDPOINTS if e["model"]]
# Ollama's compatibility layers (openai.NewError, anthropic.NewError): the type of each status.
OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def send(port, method, path, doc=None, headers=None, timeout=15):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = doc if isinstance(doc, bytes | None) else json.dumps(doc).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_error_shape(dialect, status, raw):
    """The body `raw` is the gateway's error of `status` in `dialect`; returns the message."""
    doc = json.loads(raw)
    if dialect == "openai":
        assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}, doc
        assert doc["error"]["type"] == OPENAI_TYPES.get(status, "api_error"), doc
        return doc["error"]["message"]
    if dialect == "anthropic":
        assert doc["type"] == "error" and set(doc["error"]) == {"type", "message"}, doc
        assert doc["error"]["type"] == ANTHROPIC_TYPES.get(status, "api_error"), doc
        assert doc["request_id"].startswith("req_"), doc
        return doc["error"]["message"]
    assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
    return doc["error"]


def body_for(entry, model):
    """A small valid request of the endpoint naming `model`."""
    doc = {"name" if entry["model"] == "model|name" else "model": model}
    if entry["affinity"] in ("chat", "messages"):
        doc["messages"] = [{"role": "user", "content": "hello"}]
    elif entry["affinity"] in ("prompt", "responses"):
        doc["prompt" if entry["affinity"] == "prompt" else "input"] = "hello"
    elif entry["body"] == "embedding":
        doc["input"] = "hello"
    return doc


def start(tmp_path, gw, delay=0.0, **overrides):
    a, b = Backend(["m1:latest", "m3:latest"], delay), Backend(["m2:latest", "m3:latest"], delay)
    gateway = gateway_over(tmp_path, gw, [(a.port, 2, ["m1", "m3"]), (b.port, 2, ["m2", "m3"])],
                           **{"gateway_expose_upstream": True, **overrides})
    return a, b, gateway


@pytest.fixture(scope="module")
def stack(tmp_path_factory, gw):
    a, b, gateway = start(tmp_path_factory.mktemp("dialects"), gw)
    yield a, b, gateway
    gateway.stop()
    a.stop()
    b.stop()


def test_every_model_endpoint_routes_into_the_models_pool(stack):
    a, b, gateway = stack
    assert {e["path"] for e in MODEL_ENDPOINTS} >= {
        "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show", "/v1/chat/completions",
        "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/models/{model}"}
    for entry in MODEL_ENDPOINTS:
        for _ in range(4):  # both instances are idle: a pool of one is the only way the four land on B
            if entry["model"] == "path":
                status, headers, raw = send(gateway.port, "GET", entry["path"].replace("{model}", "m2"))
            else:
                status, headers, raw = send(gateway.port, "POST", entry["path"], body_for(entry, "m2"))
            assert status == 200, (entry["path"], status, raw)
            assert headers["x-herd-upstream"] == f"127.0.0.1:{b.port}", entry["path"]
    assert not [r for r in a.requests if r[0] == "POST" or r[1].startswith("/v1/models/")]


@pytest.mark.parametrize("entry", MODEL_ENDPOINTS, ids=[e["path"] for e in MODEL_ENDPOINTS])
def test_unknown_model_and_bad_body_in_the_endpoints_dialect(stack, entry):
    _a, _b, gateway = stack
    if entry["model"] == "path":
        status, _h, raw = send(gateway.port, "GET", entry["path"].replace("{model}", "nope"))
    else:
        status, _h, raw = send(gateway.port, "POST", entry["path"], body_for(entry, "nope"))
    assert status == 404
    assert "not found" in assert_error_shape(entry["dialect"], 404, raw)
    if entry["model"] != "path":
        status, _h, raw = send(gateway.port, "POST", entry["path"], b"[1, 2")
        assert status == 400
        assert_error_shape(entry["dialect"], 400, raw)


def test_nginx_own_413_is_in_the_endpoints_dialect(stack):
    """client_max_body_size refuses before any Lua of the request runs: the error location finds the dialect by
    the path."""
    _a, _b, gateway = stack
    for path, dialect in (("/v1/messages", "anthropic"), ("/v1/chat/completions", "openai"), ("/api/chat", "ollama")):
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        conn.putrequest("POST", path)
        conn.putheader("Content-Length", str(17 * 1024 * 1024))
        conn.endheaders()
        resp = conn.getresponse()  # answered without sending a byte of the body
        raw = resp.read()
        conn.close()
        assert resp.status == 413 and "too large" in assert_error_shape(dialect, 413, raw), (path, raw)


def test_busy_answers_in_each_dialect_with_the_pools_measured_retry_after(tmp_path, gw):
    """Pool m2 (B, 2 slots) full, no queue (gateway_queue_max 0): each dialect's busy answer at once. The
    Retry-After is the pool's measured wait: the two held requests waited 0 s, so 1 (the floor)."""
    a, b, gateway = start(tmp_path, gw, delay=2.0, gateway_queue_max=0)
    try:
        held = []
        threads = [threading.Thread(target=lambda: held.append(send(gateway.port, "POST", "/api/generate",
                                                                    {"model": "m2", "prompt": "hold"})))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        for entry in MODEL_ENDPOINTS:
            if entry["path"] in ("/api/chat", "/v1/chat/completions", "/v1/messages", "/v1/responses"):
                status, headers, raw = send(gateway.port, "POST", entry["path"], body_for(entry, "m2"))
                assert status == 503, (entry["path"], status, raw)
                assert "busy" in assert_error_shape(entry["dialect"], 503, raw)
                assert headers["retry-after"] == "1", headers
        for thread in threads:
            thread.join(10)
        assert [s for s, _h, _r in held] == [200, 200]
        assert len([r for r in b.requests if r[0] == "POST"]) == 2 and not a.requests
    finally:
        gateway.stop()
        a.stop()
        b.stop()


RETRY_LUA = r"""
local settings = require("herd_gateway.settings")
local stats = require("herd_gateway.stats")
settings.configure(settings.build({retry_after = 7, endpoints = ENDPOINTS}, {servers = {}}, {}, function() return "127.0.0.1" end))
local out = {unmeasured = stats.retry_after("m:latest")}
for _ = 1, 30 do stats.observe_wait("m:latest", 4.2) end
out.slow = stats.retry_after("m:latest")
for _ = 1, 60 do stats.observe_wait("m:latest", 0.01) end
out.fast = stats.retry_after("m:latest")
for _ = 1, 60 do stats.observe_wait("m:latest", 600) end
out.capped = stats.retry_after("m:latest")
out.other = stats.retry_after("n:latest")
ngx.say(require("cjson.safe").encode(out))
"""


def test_retry_after_follows_the_pools_measured_wait(tmp_path):
    """gateway_retry_after until the pool has admitted a request; then the moving average of its waits, rounded
    up, within 1..60 s (both SDKs ignore a longer Retry-After)."""
    assert run_lua(tmp_path, RETRY_LUA) == {"unmeasured": 7, "slow": 5, "fast": 1, "capped": 60, "other": 7}


def test_unauthorized_in_each_dialect(tmp_path, gw):
    keys = gw.gateway_api_keys([{"name": "team-a", "key": KEY}])
    a, b, gateway = start(tmp_path, gw, _gateway_keys=keys)
    try:
        for path, dialect in (("/v1/messages", "anthropic"), ("/v1/responses", "openai"), ("/api/chat", "ollama"),
                              ("/v1/models", "openai"), ("/api/tags", "ollama")):
            status, headers, raw = send(gateway.port, "POST" if "/v1/m" in path or "chat" in path or "resp" in path
                                        else "GET", path, {"model": "m2"})
            assert status == 401 and headers["www-authenticate"] == 'Bearer realm="herd"', (path, status, raw)
            assert "API key" in assert_error_shape(dialect, 401, raw)
        assert not a.requests and not b.requests
    finally:
        gateway.stop()
        a.stop()
        b.stop()


def test_rate_limited_in_each_dialect(tmp_path, gw):
    """One request a second, no burst (gateway_rate_burst 0: nginx takes no burst=0, the role writes none)."""
    a, b, gateway = start(tmp_path, gw, gateway_rate_limit=1, gateway_rate_burst=0)
    try:
        doc = {"model": "m2", "messages": [{"role": "user", "content": "hi"}]}
        answers = [send(gateway.port, "POST", "/v1/messages", doc) for _ in range(4)]
        limited = [(h, r) for s, h, r in answers if s == 429]
        assert limited and answers[0][0] == 200, [(s, r) for s, _h, r in answers]
        for headers, raw in limited:
            assert headers["retry-after"] == "1" and "rate limit" in assert_error_shape("anthropic", 429, raw)
        time.sleep(1.1)
        status, _h, raw = send(gateway.port, "POST", "/v1/chat/completions", doc)
        status2, _h, raw2 = send(gateway.port, "POST", "/v1/chat/completions", doc)
        assert (status, status2) == (200, 429), (raw, raw2)
        assert_error_shape("openai", 429, raw2)
        assert json.loads(raw2)["error"]["code"] == "rate_limit_exceeded"
    finally:
        gateway.stop()
        a.stop()
        b.stop()


# ------------------------------------------------------------------------------- conversation affinity for agents


def _served_by(gateway, path, doc, headers=None):
    status, answer_headers, raw = send(gateway.port, "POST", path, doc, headers)
    assert status == 200, (path, status, raw)
    return answer_headers["x-herd-upstream"]


def _turns(first, n):
    """n turns of a conversation that starts with `first`: each resends the earlier ones."""
    messages = [{"role": "user", "content": first}]
    for turn in range(n):
        yield list(messages)
        messages += [{"role": "assistant", "content": [{"type": "text", "text": f"answer {turn}"}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{turn}", "content": "ok"}]}]


@pytest.mark.parametrize("how", ["claude-code-header", "metadata.user_id", "prompt_cache_key", "messages-prefix",
                                 "responses-prefix"])
def test_agent_conversations_keep_their_instance(stack, how):
    """Six conversations of three turns on pool m3 (A and B, both idle), each of its own agent (system prompt):
    without affinity the pool's turn counter alternates instances turn by turn; with it every turn of a conversation
    lands where its first did (by its session identifier, or by its prompt prefix), and the conversations, sharing
    no prefix, use both instances."""
    _a, _b, gateway = stack
    tools = [{"name": "read_file", "description": "read a file", "input_schema": {"type": "object"}}]
    first_instances = set()
    for session in range(6):
        served = set()
        for turn, messages in enumerate(_turns(f"task {session} {how}", 3)):
            headers, path = {}, "/v1/messages"
            doc = {"model": "m3", "max_tokens": 64, "system": f"You are coding agent {session}.", "tools": tools,
                   "messages": messages}
            if how == "claude-code-header":
                headers["X-Claude-Code-Session-Id"] = f"session-{session}"
                doc["messages"] = [{"role": "user", "content": f"turn {turn}, unrelated text"}]
            elif how == "metadata.user_id":
                doc["metadata"] = {"user_id": json.dumps({"session_id": f"s-{session}"})}
                doc["messages"] = [{"role": "user", "content": f"turn {turn}"}]
            elif how == "prompt_cache_key":
                path = "/v1/responses"
                doc = {"model": "m3", "input": f"session {session} {how}, turn {turn}",
                       "prompt_cache_key": f"conv-{session}"}
            elif how == "responses-prefix":
                path = "/v1/responses"
                doc = {"model": "m3", "instructions": f"You are coding agent {session}.", "tools": tools,
                       "input": [{"role": "user", "content": f"task {session}"}]
                       + [{"type": "function_call_output", "call_id": f"c{t}", "output": "ok"} for t in range(turn)]}
            served.add(_served_by(gateway, path, doc, headers))
        assert len(served) == 1, (how, session, served)
        first_instances |= served
    assert len(first_instances) == 2, first_instances
