"""Token accounting and per-key limits (issue 30), against the real nginx serving the role's rendered gateway in
front of a herd emulator instance (the lab stand-in for Ollama's inference, two slots) holding herd-tiny:1b and
herd-embed:v1.

- Every endpoint that reports usage, streamed and not (OpenAI streams with and without include_usage): the access
  log's prompt_tokens / output_tokens equal the usage the instance reported in the answer the client got, and the
  exporter's parser sums them per key and model.
- A client that hangs up mid-stream: the log counts the records delivered ("delivered"), at least what the client
  read and fewer than the whole answer.
- The scanner (herd_gateway/usage.lua) on answers cut at random chunk boundaries, with decoy member names inside
  strings and tool-call arguments: the same counts as the answer read whole, the final record's.
- Per-key limits, each in the endpoint's dialect: a model outside a key's `models` is 404 as if absent; over
  max_requests in flight plus queued, and over tokens_per_minute: 429 with Retry-After.
"""

import json
import random
import socket
import threading
import time

import pytest
from conftest import emulated_stack, run_lua
from herd_testing import load_module
from test_dialects import assert_error_shape, send

TINY, EMBED = "herd-tiny:1b", "herd-embed:v1"
KEYS = {
    "meter": "meter-key-0123456789abcdefghijklmnopq",
    "narrow": "narrow-key-0123456789abcdefghijklmnop",
    "capped": "capped-key-0123456789abcdefghijklmnop",
    "thrifty": "thrifty-key-0123456789abcdefghijklmno",
}


def auth(name):
    return {"Authorization": f"Bearer {KEYS[name]}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, gw):
    tmp = tmp_path_factory.mktemp("usage")
    keys = gw.gateway_api_keys([
        {"name": "meter", "key": KEYS["meter"]},
        {"name": "narrow", "key": KEYS["narrow"], "models": [EMBED]},
        {"name": "capped", "key": KEYS["capped"], "max_requests": 1},
        {"name": "thrifty", "key": KEYS["thrifty"], "tokens_per_minute": 40},
    ])
    with emulated_stack(tmp, gw, [TINY, EMBED], parallel=2, _gateway_keys=keys, gateway_queue_max=8) as (gateway, _):
        yield gateway.port, tmp


def log_lines(tmp):
    path = tmp / "herd-gateway.access.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_log(tmp, count_before, limit=5.0):
    """The access log's line written after `count_before` lines (the log phase runs after the answer)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        lines = log_lines(tmp)
        if len(lines) > count_before:
            return lines[count_before]
        time.sleep(0.05)
    raise AssertionError("no access log line for the request")


def reported(raw, path):
    """(prompt, output) as the answer itself reports them: the last usage of a stream, or the object's."""
    prompt = output = None
    text = raw.decode()
    if text.lstrip().startswith("{") and "\n{" not in text.strip():
        records = [json.loads(text)]
    elif "data:" in text:
        records = [json.loads(line[5:]) for line in text.splitlines()
                   if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]")]
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for rec in records:
        if path.startswith("/api/"):
            prompt = rec.get("prompt_eval_count", prompt)
            output = rec.get("eval_count", output)
            continue
        usage = rec.get("usage")
        for outer in ("response", "message"):  # Responses' response.completed, Anthropic's message_start
            if not usage and isinstance(rec.get(outer), dict):
                usage = rec[outer].get("usage")
        if usage:
            prompt = usage.get("prompt_tokens", usage.get("input_tokens", prompt))
            output = usage.get("completion_tokens", usage.get("output_tokens", output))
    return prompt or 0, output or 0


CASES = [
    ("/api/generate", {"model": TINY, "prompt": "count me", "options": {"num_predict": 12}}),
    ("/api/chat", {"model": TINY, "messages": [{"role": "user", "content": "count me"}], "options": {"num_predict": 12}}),
    ("/api/embed", {"model": EMBED, "input": ["count me", "and me"]}),
    ("/v1/chat/completions", {"model": TINY, "messages": [{"role": "user", "content": "count me"}], "max_tokens": 12}),
    ("/v1/completions", {"model": TINY, "prompt": "count me", "max_tokens": 12}),
    ("/v1/embeddings", {"model": EMBED, "input": "count me"}),
    ("/v1/responses", {"model": TINY, "input": "count me", "max_output_tokens": 12}),
    ("/v1/messages", {"model": TINY, "max_tokens": 12, "messages": [{"role": "user", "content": "count me"}]}),
]
STREAMS = {"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}


def variants():
    for path, doc in CASES:
        if path.startswith("/api/") and path in STREAMS:
            yield path, {**doc, "stream": False}, "whole"
            yield path, {**doc, "stream": True}, "stream"
        elif path in STREAMS:
            yield path, doc, "whole"
            yield path, {**doc, "stream": True}, "stream"
            if path in ("/v1/chat/completions", "/v1/completions"):
                yield path, {**doc, "stream": True, "stream_options": {"include_usage": True}}, "stream+usage"
        else:
            yield path, doc, "whole"


def test_every_endpoint_logs_the_usage_the_instance_reported(stack, gw):
    port, tmp = stack
    parser = load_module("roles/exporter/files/herd_exporter.py", "herd_exporter_for_usage")
    stats = parser.GatewayStats(parser.DEFAULT_BUCKETS)
    sums = {}
    for path, doc, how in variants():
        before = len(log_lines(tmp))
        status, headers, raw = send(port, "POST", path, doc, auth("meter"))
        assert status == 200, (path, how, raw[:300])
        line = last_log(tmp, before)
        prompt, output = reported(raw, path)
        got = (int(line["prompt_tokens"]), int(line["output_tokens"]))
        if how == "stream" and path in ("/v1/chat/completions", "/v1/completions"):
            # No usage in the stream: what was delivered, one per data event.
            events = sum(1 for text in raw.decode().splitlines() if text.startswith("data:"))
            assert line["tokens_from"] == "delivered" and got == (0, events), (path, how, line)
        else:
            assert line["tokens_from"] == "reported" and got == (prompt, output), (path, how, line, prompt, output)
            assert prompt > 0 and (output > 0 or "embed" in path), (path, how, raw[:300])
        if how.startswith("stream"):
            # The stack generates 100 tokens/s per slot: the first token (and, as with Ollama, the stream's first
            # byte) comes at least 10 ms after the request, which the log's millisecond figure shows.
            assert float(line["ttft"]) >= 0.009, line
            if line["tokens_from"] == "reported" and output > 1:
                assert 0 < float(line["tpot"]) < 1, line
        else:
            assert line["ttft"] == "" and line["tpot"] == "", line
        model = TINY if doc["model"] == TINY else EMBED
        for kind, value in zip(("prompt", "output"), got, strict=True):
            sums[(model, kind)] = sums.get((model, kind), 0) + value
        stats.add_line(json.dumps(line))
    assert {(m, k): v for (key, m, k), v in stats.tokens.items() if key == "meter"} == {
        k: v for k, v in sums.items() if v}, stats.tokens
    assert stats.tenant_requests[("meter", TINY, "200")] == sum(1 for p, d, _ in variants() if d["model"] == TINY)
    assert stats.ttft[TINY].total == sum(1 for _p, _d, how in variants() if how.startswith("stream"))


def test_a_client_that_hangs_up_counts_what_was_delivered(stack):
    port, tmp = stack
    before = len(log_lines(tmp))
    body = json.dumps({"model": TINY, "prompt": "a long answer", "stream": True, "options": {"num_predict": 300}})
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST /api/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['meter']}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while received.count(b'"done":false') < 20:
        chunk = sock.recv(65536)
        assert chunk, received[-300:]
        received += chunk
    read = received.count(b'"done":false')
    sock.close()
    line = last_log(tmp, before, limit=10)
    # The status stays the 200 already sent; the answer was not whole.
    assert line["status"] == "200" and line["tokens_from"] == "delivered", line
    # At 100 tokens/s, 300 tokens take 3 s: the hang-up after about 0.2 s leaves most of them unsent.
    assert read <= int(line["output_tokens"]) < 300 and line["prompt_tokens"] == "0", (read, line)


def _answer(rng, family):
    """An answer of `family` with decoys (member names inside strings, tool-call arguments named like the usage
    members before the final record); (its text, framing, prompt, output) of the final record."""
    prompt, output = rng.randrange(1, 10**6), rng.randrange(0, 10**6)
    names = {"native": ("prompt_eval_count", "eval_count"), "openai": ("prompt_tokens", "completion_tokens"),
             "io": ("input_tokens", "output_tokens")}[family]
    decoy = f'\\"{names[1]}\\":{rng.randrange(10**7)}, {names[0]}: 5'
    if family == "native":
        records = [json.dumps({"response": decoy, "done": False}),
                   json.dumps({"message": {"tool_calls": [{"function": {"arguments": {names[1]: 7}}}]}, "done": False}),
                   json.dumps({"response": "", "done": True, names[0]: prompt, names[1]: output})]
        return "\n".join(records) + "\n", "ndjson", prompt, output
    usage = {names[0]: prompt, names[1]: output}
    records = [json.dumps({"choices": [{"delta": {"content": decoy}}], "usage": {names[0]: 0, names[1]: 0}}),
               json.dumps({"type": "message_delta", "usage": usage})]
    return "".join(f"data: {r}\n\n" for r in records) + "data: [DONE]\n\n", "sse", prompt, output


def test_the_scanner_reads_the_final_usage_whatever_the_chunks(tmp_path):
    rng = random.Random(30)
    cases = []
    for index in range(300):
        family = ("native", "openai", "io")[index % 3]
        text, framing, prompt, output = _answer(rng, family)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 40))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        cases.append({"family": family, "framing": framing, "chunks": chunks, "want": [prompt, output]})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    got = run_lua(tmp_path, f"""
local usage = require("herd_gateway.usage")
local cjson = require("cjson.safe")
local handle = io.open("{tmp_path}/cases.json")
local cases = cjson.decode(handle:read("*a"))
handle:close()
local out = {{}}
for i, case in ipairs(cases) do
    local ctx = {{}}
    usage.start(ctx, case.family)
    usage.framing(ctx, case.framing == "sse" and "text/event-stream" or "application/x-ndjson")
    for j, chunk in ipairs(case.chunks) do
        usage.chunk(ctx, chunk, j == #case.chunks)
    end
    out[i] = {{ ctx.herd_usage.prompt or -1, ctx.herd_usage.output or -1, ctx.herd_usage.records }}
end
ngx.say(cjson.encode(out))
""")
    for case, (prompt, output, records) in zip(cases, got, strict=True):
        assert [prompt, output] == case["want"], case
        assert records == 3, case  # three NDJSON lines, or three SSE data events


def test_a_model_outside_the_keys_models_is_absent(stack):
    port, _tmp = stack
    for path, doc in CASES:
        if doc["model"] != TINY:
            continue
        status, _headers, raw = send(port, "POST", path, doc, auth("narrow"))
        dialect = "anthropic" if path == "/v1/messages" else "openai" if path.startswith("/v1/") else "ollama"
        assert status == 404 and "not found" in assert_error_shape(dialect, 404, raw), (path, raw)
    status, _headers, raw = send(port, "POST", "/api/embed", {"model": EMBED, "input": "x"}, auth("narrow"))
    assert status == 200, raw[:200]
    # The catalogue leaves the model out for that key too; another key sees every model.
    for path, member, name in (("/api/tags", "models", "name"), ("/v1/models", "data", "id")):
        listed = {}
        for key in ("narrow", "meter"):
            status, _headers, raw = send(port, "GET", path, None, auth(key))
            assert status == 200, raw[:200]
            listed[key] = sorted(m[name] for m in json.loads(raw)[member])
        assert listed == {"narrow": [EMBED], "meter": [EMBED, TINY]}, listed
        if path == "/v1/models":
            assert json.loads(raw)["object"] == "list"


def test_over_max_requests_is_429_in_each_dialect(stack):
    port, _tmp = stack
    long_doc = {"model": TINY, "prompt": "hold", "stream": True, "options": {"num_predict": 150}}
    holder = threading.Thread(target=send, args=(port, "POST", "/api/generate", long_doc, auth("capped")))
    holder.start()
    try:
        time.sleep(0.4)
        for path, doc in CASES:
            if doc["model"] != TINY:
                continue
            status, headers, raw = send(port, "POST", path, doc, auth("capped"))
            dialect = "anthropic" if path == "/v1/messages" else "openai" if path.startswith("/v1/") else "ollama"
            assert status == 429 and int(headers["retry-after"]) >= 1, (path, status, raw[:200])
            assert "1 requests in flight or queued" in assert_error_shape(dialect, 429, raw), raw
    finally:
        holder.join(timeout=30)
    # The place is given back when the answer ends.
    status, _headers, raw = send(port, "POST", "/api/generate", {**long_doc, "options": {"num_predict": 2}},
                                 auth("capped"))
    assert status == 200, raw[:200]


def test_over_tokens_per_minute_is_429_in_each_dialect(stack):
    port, tmp = stack
    doc = {"model": TINY, "prompt": "spend", "stream": False, "options": {"num_predict": 40}}
    status, _headers, raw = send(port, "POST", "/api/generate", doc, auth("thrifty"))
    assert status == 200, raw[:200]
    spent = json.loads(raw)
    assert spent["prompt_eval_count"] + spent["eval_count"] >= 40, spent
    for path, body in CASES:
        if body["model"] != TINY:
            continue
        status, headers, raw = send(port, "POST", path, body, auth("thrifty"))
        dialect = "anthropic" if path == "/v1/messages" else "openai" if path.startswith("/v1/") else "ollama"
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 60, (path, status, raw[:200])
        assert "40 tokens per minute" in assert_error_shape(dialect, 429, raw), raw
    # Another key is not affected.
    status, _headers, _raw = send(port, "POST", "/api/generate", doc, auth("meter"))
    assert status == 200
