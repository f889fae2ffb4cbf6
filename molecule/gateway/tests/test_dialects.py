"""Every endpoint in its dialect through the deployed gateway (issue 29), on the lab's emulators.

Embeddings of the embedding-only model (herd-embed:v1, pool h4-gpu1:3) through /api/embed and /v1/embeddings;
chats of herd-tiny:1b through the Anthropic Messages API (/v1/messages) and the OpenAI Responses API
(/v1/responses), streamed (SSE) and not: every answer comes from an instance of the model's pool (access log), and
the gateway's own errors come in each API's shape. playbooks/smoke.yml asks the embedding model with an embed.
"""

import json

from conftest import GW, KEY, access_log, call, playbook
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
