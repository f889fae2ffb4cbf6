"""Every endpoint in its dialect through the deployed gateway (issue 29), on the lab's emulators.

Embeddings of the embedding-only model (herd-embed:v1, pool h4-gpu1:3) through /api/embed and /v1/embeddings;
chats of herd-tiny:1b through the Anthropic Messages API (/v1/messages) and the OpenAI Responses API
(/v1/responses), streamed (SSE) and not: every answer comes from an instance of the model's pool (access log), and
the gateway's own errors come in each API's shape. playbooks/smoke.yml asks the embedding model with an embed.
A second API key with limits (team-b: herd-tiny:1b only, one request at a time) gets 404 for the other models and
429 with Retry-After over its limit, in each dialect, while team-a is served; its answer's tokens are in the log.
"""

import json
import threading
import time

from conftest import GW, KEY, access_log, call, playbook, pools, stream
from test_gateway import EMBED, POOL_OF, TINY, upstreams_of, wait_idle


def sse_events(text):
    """(event, data) of every server-sent event of an answer body."""
    events = []
    for block in text.split("\n\n"):
        name, data = None, None
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        if data is not None:
            events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


def served_by_pool(gw, before, path, pool):
    """Every access-log entry of `path` since `before` was answered 200 by an instance of `pool`."""
    addresses = upstreams_of(gw)
    entries = [e for e in access_log(gw)[before:] if e["uri"] == path]
    assert entries and all(e["status"] == "200" and e["pool"] == pool for e in entries), entries
    assert all(POOL_OF[addresses[e["upstream"]]] == pool for e in entries), entries
    return entries


def test_embeddings_through_the_gateway(gw):
    before = len(access_log(gw))
    reply = call(gw, "POST", GW + "/api/embed", key=KEY, body={"model": EMBED, "input": ["first", "second"]})
    assert reply["status"] == 200, reply
    vectors = json.loads(reply["body"])["embeddings"]
    assert len(vectors) == 2 and len(vectors[0]) == 768 and vectors[0] != vectors[1]
    again = json.loads(call(gw, "POST", GW + "/api/embed", key=KEY, body={"model": EMBED, "input": "first"})["body"])
    assert again["embeddings"][0] == vectors[0]
    reply = call(gw, "POST", GW + "/v1/embeddings", key=KEY, body={"model": EMBED, "input": "first"})
    doc = json.loads(reply["body"])
    assert reply["status"] == 200 and doc["object"] == "list" and doc["data"][0]["embedding"] == vectors[0], doc
    served_by_pool(gw, before, "/api/embed", EMBED)
    served_by_pool(gw, before, "/v1/embeddings", EMBED)
    # The embedding-only model cannot generate: Ollama's 400, passed through from the instance.
    reply = call(gw, "POST", GW + "/api/generate", key=KEY, body={"model": EMBED, "prompt": "hi", "stream": False})
    assert reply["status"] == 400 and "does not support generate" in json.loads(reply["body"])["error"]


def test_messages_and_responses_streamed_and_not(gw):
    before = len(access_log(gw))
    body = {"model": TINY, "max_tokens": 64, "system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]}
    reply = call(gw, "POST", GW + "/v1/messages", key=KEY, body=body)
    message = json.loads(reply["body"])
    assert reply["status"] == 200 and message["type"] == "message" and message["content"][0]["text"], message
    assert message["usage"]["output_tokens"] > 0
    reply = call(gw, "POST", GW + "/v1/messages", key=KEY, body=dict(body, stream=True))
    events = sse_events(reply["body"])
    assert reply["status"] == 200 and reply["headers"]["content-type"].startswith("text/event-stream")
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    assert [d for n, d in events if n == "message_delta"][0]["usage"]["output_tokens"] > 0
    served_by_pool(gw, before, "/v1/messages", TINY)

    before = len(access_log(gw))
    body = {"model": TINY, "instructions": "Be brief.", "input": "hi", "max_output_tokens": 64}
    reply = call(gw, "POST", GW + "/v1/responses", key=KEY, body=body)
    response = json.loads(reply["body"])
    assert reply["status"] == 200 and response["object"] == "response" and response["status"] == "completed", response
    assert response["usage"]["output_tokens"] > 0
    reply = call(gw, "POST", GW + "/v1/responses", key=KEY, body=dict(body, stream=True))
    events = sse_events(reply["body"])
    assert events[0][0] == "response.created" and events[-1][0] == "response.completed", [n for n, _d in events]
    assert events[-1][1]["response"]["usage"]["output_tokens"] > 0
    served_by_pool(gw, before, "/v1/responses", TINY)
    wait_idle(gw)


def test_gateway_errors_in_each_dialect(gw):
    reply = call(gw, "POST", GW + "/v1/messages", key=KEY, body={"model": "nope:1b", "messages": []})
    doc = json.loads(reply["body"])
    assert reply["status"] == 404 and doc["type"] == "error" and doc["error"]["type"] == "not_found_error", doc
    reply = call(gw, "POST", GW + "/v1/responses", key=KEY, body={"model": "nope:1b", "input": "hi"})
    doc = json.loads(reply["body"])
    assert reply["status"] == 404 and doc["error"]["type"] == "not_found_error" and "param" in doc["error"], doc
    reply = call(gw, "POST", GW + "/v1/messages", body={"model": TINY})
    doc = json.loads(reply["body"])
    assert reply["status"] == 401 and doc["error"]["type"] == "authentication_error", doc


def test_smoke_embeds_with_the_embedding_model():
    rc, out = playbook("playbooks/smoke.yml")
    assert rc == 0, out[-3000:]
    assert "herd-embed:v1" in out and "failed=0" in out, out[-3000:]


KEY_B = "h4-lab-key-team-b-0123456789abcdef"
SMALL = "herd-small:7b"
DIALECT_CALLS = (  # (path, body for a model, the error's message in that dialect)
    ("/api/generate", lambda m: {"model": m, "prompt": "hi", "stream": False, "options": {"num_predict": 4}},
     lambda d: d["error"]),
    ("/v1/chat/completions", lambda m: {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
     lambda d: d["error"]["message"]),
    ("/v1/messages", lambda m: {"model": m, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
     lambda d: d["error"]["message"] if d.get("type") == "error" else None),
)


def test_a_keys_limits_in_each_dialect(gw):
    for path, body, message in DIALECT_CALLS:
        reply = call(gw, "POST", GW + path, key=KEY_B, body=body(SMALL))
        assert reply["status"] == 404 and "not found" in message(json.loads(reply["body"])), (path, reply)
    before = len(access_log(gw))
    held = {}
    holder = threading.Thread(target=lambda: held.update(stream(gw, key=KEY_B, tokens=120)))
    holder.start()
    try:
        # The stream holds team-b's one place from its admission: once it is in flight, a request is over the limit.
        deadline = time.monotonic() + 10
        while sum(i["inflight"] for i in pools(gw)[TINY]["instances"]) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        for path, body, message in DIALECT_CALLS:
            reply = call(gw, "POST", GW + path, key=KEY_B, body=body(TINY))
            assert reply["status"] == 429 and int(reply["headers"]["retry-after"]) >= 1, (path, reply)
            assert "1 requests in flight or queued" in message(json.loads(reply["body"])), reply
        # Another key is not limited by team-b's.
        assert call(gw, "POST", GW + "/api/generate", key=KEY, body=DIALECT_CALLS[0][1](TINY))["status"] == 200
    finally:
        holder.join(timeout=60)
    assert held.get("status") == 200 and held.get("done"), held
    wait_idle(gw)
    entries = [e for e in access_log(gw)[before:] if e["key"] == "team-b" and e["status"] == "200"]
    assert len(entries) == 1 and entries[0]["tokens_from"] == "reported", entries
    assert int(entries[0]["output_tokens"]) == 120 and int(entries[0]["prompt_tokens"]) > 0, entries
    assert float(entries[0]["ttft"]) > 0 and float(entries[0]["tpot"]) > 0, entries
    # The place is given back: team-b is served again.
    assert call(gw, "POST", GW + "/api/generate", key=KEY_B, body=DIALECT_CALLS[0][1](TINY))["status"] == 200
