"""Agents through the gateway (issue 29): PyPI's anthropic and openai SDKs, as coding agents use them, pointed at
the real nginx serving the role's rendered gateway in front of two herd emulator instances (lab stand-ins for
Ollama's inference, one slot each) that both hold herd-tiny:1b and herd-embed:v1 (an embedding-only model).

- A multi-turn, tool-using conversation on /v1/messages in Claude Code's shape (system blocks, tools,
  metadata.user_id) keeps its instance on every turn, and no instance holds more than its one slot; the agent's
  later sessions (same system prompt and tools) go to the instance that holds that shared prefix.
- An overloaded pool (both slots busy, no queue: gateway_queue_max 0): the SDK gets the gateway's 503 in its own
  dialect with Retry-After, waits and retries, and returns the answer instead of raising.
- The openai SDK: a streamed chat completion, a Responses call and embeddings (/v1/embeddings, base64 as the SDK
  asks) from the embedding model.
"""

import json
import threading
import time
import urllib.request

import pytest
from conftest import emulated_stack

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

TINY, EMBED = "herd-tiny:1b", "herd-embed:v1"
SYSTEM = [{"type": "text", "text": "You are a coding agent. Read files with the tools you are given."}]
TOOLS = [{"name": "read_file", "description": "Read a file of the repository",
          "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]
HOLD_TOKENS = 150  # at 100 tokens/s: a request that holds its slot 1.5 s


@pytest.fixture(scope="module")
def stack(tmp_path_factory, gw):
    tmp = tmp_path_factory.mktemp("agent-sdk")
    with emulated_stack(tmp, gw, [TINY, EMBED], gpus=(0, 1), gateway_expose_upstream=True,
                        gateway_queue_max=0) as (gateway, emus):
        yield f"http://127.0.0.1:{gateway.port}", emus, tmp


def access_log(tmp):
    return [json.loads(line) for line in (tmp / "herd-gateway.access.log").read_text().splitlines()]


def in_flight(url, pool):
    """Requests in flight on the instances of `pool`, by the gateway's /herd/pools."""
    with urllib.request.urlopen(url + "/herd/pools", timeout=5) as resp:
        pools = json.loads(resp.read())["pools"]
    return sum(i["inflight"] for p in pools if p["name"] == pool for i in p["instances"])


def test_a_tool_using_conversation_keeps_its_instance(stack):
    url, emus, _tmp = stack
    client = anthropic.Anthropic(base_url=url, api_key="unused-by-herd", max_retries=0)
    instances = set()
    for session in range(4):
        metadata = {"user_id": json.dumps({"session_id": f"session-{session}"})}
        messages = [{"role": "user", "content": "Use tool read_file on README.md"}]
        served, kinds = set(), []
        for _turn in range(4):
            raw = client.messages.with_raw_response.create(model=TINY, max_tokens=4096, system=SYSTEM, tools=TOOLS,
                                                          messages=messages, metadata=metadata)
            served.add(raw.headers["x-herd-upstream"])
            message = raw.parse()
            kinds.append(message.stop_reason)
            assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
            messages.append({"role": "assistant", "content": [block.model_dump(exclude_none=True)
                                                              for block in message.content]})
            if message.stop_reason == "tool_use":
                call = message.content[-1]
                assert call.type == "tool_use" and call.name == "read_file"
                messages.append({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "# herd\nOne Ollama service."}]})
            else:
                messages.append({"role": "user", "content": "Use tool read_file on site.yml"})
        assert kinds == ["tool_use", "end_turn", "tool_use", "end_turn"], kinds
        assert len(served) == 1, (session, served)
        instances |= served
    # Conversations start on the least loaded instance: both are used.
    # The sessions ran one after another with the same system prompt and tools: a new session goes where that shared
    # prefix is cached (prefix routing), not to whichever instance is idle.
    assert len(instances) == 1, instances
    # A streamed turn: the SDK assembles the same kind of message from the SSE events.
    with client.messages.stream(model=TINY, max_tokens=4096, system=SYSTEM,
                                messages=[{"role": "user", "content": "Say hello"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.content[0].text and final.usage.output_tokens > 0


def _hold_the_pool(url):
    """Both slots of pool herd-tiny:1b busy for about 1.5 s (two native generates)."""
    def hold():
        body = json.dumps({"model": TINY, "prompt": "hold", "stream": False,
                           "options": {"num_predict": HOLD_TOKENS}}).encode()
        urllib.request.urlopen(urllib.request.Request(url + "/api/generate", body), timeout=30).read()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while in_flight(url, TINY) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(url, TINY) == 2
    return threads


@pytest.mark.parametrize("sdk", ["anthropic", "openai"])
def test_an_overloaded_pool_makes_the_sdk_wait_and_retry(stack, sdk):
    url, _emus, tmp = stack
    before = len(access_log(tmp))
    threads = _hold_the_pool(url)
    started = time.monotonic()
    if sdk == "anthropic":
        client = anthropic.Anthropic(base_url=url, api_key="unused-by-herd", max_retries=6)
        answer = client.messages.create(model=TINY, max_tokens=64, messages=[{"role": "user", "content": "hi"}])
        assert answer.content[0].text
        path = "/v1/messages"
    else:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused-by-herd", max_retries=6)
        answer = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        path = "/v1/chat/completions"
    waited = time.monotonic() - started
    for thread in threads:
        thread.join(30)
    deadline = time.monotonic() + 3  # nginx logs a request after its last byte reached the client
    while True:
        mine = [e for e in access_log(tmp)[before:] if e["uri"] == path]
        statuses = [e["status"] for e in mine]
        if "200" in statuses or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Refused busy at once (no instance touched), then served after the SDK's own back-off.
    assert statuses[-1] == "200" and "503" in statuses, statuses
    assert all(e["upstream"] == "" for e in mine if e["status"] == "503"), mine
    assert waited >= 0.5, waited


def test_openai_sdk_streams_responds_and_embeds(stack):
    url, _emus, tmp = stack
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused-by-herd", max_retries=0)
    chunks = list(client.chat.completions.create(model=TINY, stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Say hello"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens > 0
    response = client.responses.create(model=TINY, instructions="Be brief.", input="Say hello")
    assert response.output_text and response.usage.output_tokens > 0
    embedded = client.embeddings.create(model=EMBED, input=["first text", "second text"])
    assert [d.index for d in embedded.data] == [0, 1] and len(embedded.data[0].embedding) == 768
    assert embedded.data[0].embedding != embedded.data[1].embedding
    again = client.embeddings.create(model=EMBED, input="first text")
    assert again.data[0].embedding == embedded.data[0].embedding  # deterministic vectors
    pools = {e["uri"]: e["pool"] for e in access_log(tmp)}
    assert pools["/v1/embeddings"] == EMBED and pools["/v1/responses"] == TINY
