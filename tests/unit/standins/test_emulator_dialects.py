"""The emulator's embeddings, OpenAI completions and Responses, and Anthropic Messages: shapes, SSE event order,
usage equal to the emulated counts, tool calls, capabilities and the refusals of an embedding-only model."""

import base64
import json
import math
import struct

from standins_lab import GPUS, emulator

L20 = str(GPUS / "l20x4.json")
TINY, EMBED = "herd-tiny:1b", "herd-embed:v1"
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                            "required": ["city", "days"]}}
OPENAI_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                   "parameters": WEATHER["input_schema"]}}


def fast(lab_models, **env):
    base = {"OLLAMA_MODELS": lab_models, "HERD_LAB_GPU_SPEC": L20, "CUDA_VISIBLE_DEVICES": "0",
            "HERD_EMU_LOAD_SECONDS": "0.05", "HERD_EMU_TOKENS_PER_SECOND": "400"}
    base.update({key: str(value) for key, value in env.items()})
    return base


def sse(lines):
    """(event name or None, data) of each server-sent event; data is the JSON or the raw text ([DONE])."""
    events, name = [], None
    for _t, raw in lines:
        line = raw.decode()
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            text = line[6:]
            events.append((name, text if text == "[DONE]" else json.loads(text)))
            name = None
    return events


def chat_prompt(messages, tools=None):
    return emulator.prompt_len(emulator.chat_tokens(messages, tools))


def norm(vector):
    return math.sqrt(sum(v * v for v in vector))


def test_capabilities_follow_the_gguf_and_template():
    assert emulator.model_capabilities({"general.architecture": "llama"}, "{{ .Prompt }}") == ["completion"]
    assert emulator.model_capabilities({"general.architecture": "nomic-bert", "nomic-bert.pooling_type": 1},
                                       "{{ .Prompt }}") == ["embedding"]
    template = "{{ if .Tools }}{{ .Tools }}{{ end }}{{ .Prompt }}{{ .Suffix }}"
    assert emulator.model_capabilities({"general.architecture": "x", "x.vision.block_count": 2}, template) == [
        "completion", "vision", "tools", "insert"]


def test_embedding_only_model_and_its_refusals(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    status, show = emu.post_json("/api/show", {"model": EMBED})
    assert status == 200 and show["capabilities"] == ["embedding"]
    assert show["model_info"]["nomic-bert.pooling_type"] == 1 and show["model_info"]["nomic-bert.embedding_length"] == 768
    assert emu.post_json("/api/show", {"model": TINY})[1]["capabilities"] == ["completion", "tools"]
    # the handlers' own texts (server/routes.go), before any load
    assert emu.post_json("/api/generate", {"model": EMBED, "prompt": "x"}) == (
        400, {"error": '"herd-embed:v1" does not support generate'})
    assert emu.post_json("/api/chat", {"model": EMBED, "messages": [{"role": "user", "content": "x"}]}) == (
        400, {"error": '"herd-embed:v1" does not support chat'})
    user = [{"role": "user", "content": "x"}]
    status, body = emu.post_json("/v1/chat/completions", {"model": EMBED, "messages": user})
    assert (status, body["error"]["message"], body["error"]["type"]) == (
        400, '"herd-embed:v1" does not support chat', "invalid_request_error")
    status, body = emu.post_json("/v1/completions", {"model": EMBED, "prompt": "x"})
    assert (status, body["error"]["message"]) == (400, '"herd-embed:v1" does not support generate')
    status, body = emu.post_json("/v1/responses", {"model": EMBED, "input": "x"})
    assert (status, body["error"]["message"]) == (400, '"herd-embed:v1" does not support chat')
    status, body = emu.post_json("/v1/messages", {"model": EMBED, "max_tokens": 5, "messages": user})
    assert status == 400 and body["type"] == "error"
    assert body["error"] == {"type": "invalid_request_error", "message": '"herd-embed:v1" does not support chat'}
    assert emu.get_json("/api/ps")["models"] == []
    # a capability other than completion: handleScheduleError names the model in full
    assert emu.post_json("/api/generate", {"model": TINY, "prompt": "x", "suffix": "y"}) == (
        400, {"error": "registry.ollama.ai/library/herd-tiny:1b does not support insert"})


def test_api_embed_vectors(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    status, body = emu.post_json("/api/embed", {"model": EMBED, "input": ["the herd", "a goat"]})
    assert status == 200
    assert set(body) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert body["model"] == EMBED and body["prompt_eval_count"] == 2 + 2
    first, second = body["embeddings"]
    assert len(first) == len(second) == 768 and first != second
    assert abs(norm(first) - 1) < 1e-6 and abs(norm(second) - 1) < 1e-6
    # deterministic: the same model and text give the same vector, in every endpoint
    again = emu.post_json("/api/embed", {"model": EMBED, "input": "the herd"})[1]
    assert again["embeddings"] == [first] and first == emulator.embedding_vector(EMBED, "the herd", 768)
    assert emu.post_json("/api/embeddings", {"model": EMBED, "prompt": "the herd"}) == (200, {"embedding": first})
    # dimensions: cut, then normalised again
    short = emu.post_json("/api/embed", {"model": EMBED, "input": "the herd", "dimensions": 16})[1]["embeddings"][0]
    assert len(short) == 16 and abs(norm(short) - 1) < 1e-6 and short == emulator.normalize(first[:16])
    # a completion model embeds too (Ollama's /api/embed asks for no capability), at its embedding_length
    assert len(emu.post_json("/api/embed", {"model": TINY, "input": "x"})[1]["embeddings"][0]) == 2048
    # an empty input loads the model only
    assert emu.post_json("/api/embed", {"model": EMBED}) == (200, {"model": EMBED, "embeddings": []})
    assert emu.post_json("/api/embeddings", {"model": EMBED}) == (200, {"embedding": []})
    # longer than the context (2048 tokens): cut unless truncate is false
    long_text = "x" * 4 * 3000
    status, body = emu.post_json("/api/embed", {"model": EMBED, "input": long_text})
    assert status == 200 and body["prompt_eval_count"] == 2048
    assert body["embeddings"][0] == emulator.embedding_vector(EMBED, long_text[:8192], 768)
    assert emu.post_json("/api/embed", {"model": EMBED, "input": long_text, "truncate": False}) == (
        400, {"error": "the input length exceeds the context length"})
    # errors as Ollama writes them
    assert emu.post_json("/api/embed", {"model": EMBED, "input": 5}) == (400, {"error": "invalid input type"})
    assert emu.post_json("/api/embed", {"model": "nope", "input": "x"}) == (404, {"error": "model 'nope' not found"})
    assert emu.post_json("/api/embeddings", {"model": "nope", "prompt": "x"}) == (
        404, {"error": 'model "nope" not found, try pulling it first'})
    assert emu.post_json("/api/embed", {"input": "x"}) == (400, {"error": "model is required"})


def test_embeddings_take_a_slot_and_prompt_time(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, HERD_EMU_PROMPT_TOKENS_PER_SECOND=1000))
    status, body = emu.post_json("/api/embed", {"model": EMBED, "input": ["y" * 4 * 150, "z" * 4 * 150]})
    assert status == 200 and body["prompt_eval_count"] == 300
    assert body["total_duration"] - body["load_duration"] >= 0.29e9  # 300 tokens at 1000 tokens/s
    assert [m["name"] for m in emu.get_json("/api/ps")["models"]] == [EMBED]


def test_openai_embeddings(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    status, headers, lines = emu.post("/v1/embeddings", {"model": EMBED, "input": ["the herd", "a goat"]})
    body = json.loads(b"".join(line for _t, line in lines))
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["object"] == "list" and body["model"] == EMBED
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    assert body["data"][0]["embedding"] == emulator.embedding_vector(EMBED, "the herd", 768)
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    status, body = emu.post_json("/v1/embeddings", {"model": EMBED, "input": "the herd", "encoding_format": "base64",
                                                    "dimensions": 8})
    packed = base64.b64decode(body["data"][0]["embedding"])
    expected = emulator.normalize(emulator.embedding_vector(EMBED, "the herd", 768)[:8])
    assert [round(v, 6) for v in struct.unpack("<8f", packed)] == [round(v, 6) for v in expected]
    status, body = emu.post_json("/v1/embeddings", {"model": EMBED, "input": "x", "encoding_format": "int8"})
    assert status == 400 and body["error"]["message"].startswith("Invalid value for 'encoding_format' = int8.")
    assert emu.post_json("/v1/embeddings", {"model": EMBED, "input": []})[1]["error"]["message"] == "invalid input"
    status, body = emu.post_json("/v1/embeddings", {"model": "nope", "input": "x"})
    assert (status, body["error"]["type"], body["error"]["message"]) == (404, "not_found_error", "model 'nope' not found")


def test_openai_completions(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    prompt_tokens = emulator.prompt_len(emulator.generate_tokens("", "hello herd"))
    request = {"model": TINY, "prompt": "hello herd", "max_tokens": 3}
    status, body = emu.post_json("/v1/completions", request)
    assert status == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"text": "The herd lab", "index": 0, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3}
    status, headers, lines = emu.post("/v1/completions", dict(request, stream=True,
                                                              stream_options={"include_usage": True}))
    events = sse(lines)
    assert headers["Content-Type"] == "text/event-stream" and events[-1] == (None, "[DONE]")
    chunks = [data for _name, data in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:4]] == ["The", " herd", " lab", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "length"]
    assert all(c["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0} for c in chunks[:4])
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["completion_tokens"] == 3
    assert chunks[4]["usage"]["prompt_tokens"] == prompt_tokens
    status, body = emu.post_json("/v1/completions", {"model": TINY, "prompt": ["a", "b"]})
    assert status == 400 and "CompletionRequest.prompt" in body["error"]["message"]


RESPONSE_KEYS = {"id", "object", "created_at", "completed_at", "status", "incomplete_details", "model",
                 "previous_response_id", "instructions", "output", "error", "tools", "tool_choice", "truncation",
                 "parallel_tool_calls", "text", "top_p", "presence_penalty", "frequency_penalty", "top_logprobs",
                 "temperature", "reasoning", "usage", "max_output_tokens", "max_tool_calls", "store", "background",
                 "service_tier", "metadata", "safety_identifier", "prompt_cache_key"}


def test_openai_responses_text(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    request = {"model": TINY, "instructions": "Be brief.", "input": "hello", "max_output_tokens": 2}
    prompt = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    status, body = emu.post_json("/v1/responses", request)
    assert status == 200 and set(body) == RESPONSE_KEYS
    assert body["object"] == "response" and body["status"] == "completed" and body["instructions"] == "Be brief."
    assert body["output"][0]["type"] == "message" and body["output"][0]["content"][0]["text"] == "The herd"
    assert body["usage"]["input_tokens"] == prompt and body["usage"]["output_tokens"] == 2
    assert body["usage"]["total_tokens"] == prompt + 2
    status, headers, lines = emu.post("/v1/responses", dict(request, stream=True))
    events = sse(lines)
    assert headers["Content-Type"] == "text/event-stream"
    assert [name for name, _data in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [data["sequence_number"] for _name, data in events] == list(range(10))
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["usage"] is None
    assert events[6][1]["text"] == "The herd"
    final = events[-1][1]["response"]
    assert set(final) == RESPONSE_KEYS and final["status"] == "completed"
    assert final["usage"]["input_tokens"] == prompt and final["usage"]["output_tokens"] == 2
    status, body = emu.post_json("/v1/responses", {"model": TINY, "input": [{"type": "bogus"}]})
    assert status == 400 and body["error"]["message"] == 'input[0]: unknown input item type: "bogus"'


def test_openai_responses_tool_call_then_result(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER["input_schema"]}]
    turn = [{"role": "user", "content": "Please use tool get_weather for Oslo"}]
    status, body = emu.post_json("/v1/responses", {"model": TINY, "input": turn, "tools": tools})
    (call,) = body["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "herd", "days": 1} and call["call_id"].startswith("call_")
    status, _headers, lines = emu.post("/v1/responses", {"model": TINY, "input": turn, "tools": tools,
                                                         "stream": True})
    names = [name for name, _data in sse(lines)]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    history = turn + [{"type": "function_call", "call_id": call["call_id"], "name": "get_weather",
                       "arguments": call["arguments"]},
                      {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}]
    status, body = emu.post_json("/v1/responses", {"model": TINY, "input": history, "tools": tools,
                                                   "max_output_tokens": 3})
    assert body["output"][0]["type"] == "message" and body["output"][0]["content"][0]["text"] == "The herd lab"


def test_anthropic_messages_text(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    request = {"model": TINY, "max_tokens": 3, "system": [{"type": "text", "text": "Be brief."}],
               "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    prompt = chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    status, headers, lines = emu.post("/v1/messages", request)
    body = json.loads(b"".join(line for _t, line in lines))
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert set(body) == {"id", "type", "role", "model", "content", "stop_reason", "usage"}
    assert (body["type"], body["role"], body["model"]) == ("message", "assistant", TINY)
    assert body["content"] == [{"type": "text", "text": "The herd lab"}] and body["stop_reason"] == "max_tokens"
    assert body["usage"] == {"input_tokens": prompt, "output_tokens": 3}
    status, headers, lines = emu.post("/v1/messages", dict(request, stream=True, max_tokens=200))
    events = sse(lines)
    names = [name for name, _data in events]
    assert headers["Content-Type"] == "text/event-stream"
    assert names[:2] == ["message_start", "content_block_start"] and names[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(names[2:-3]) == {"content_block_delta"} and len(names) == 48 + 5  # HERD_EMU_RESPONSE_TOKENS
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"] == {"input_tokens": prompt, "output_tokens": 0}
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "The"}
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                             "usage": {"input_tokens": prompt, "output_tokens": 48}}


def test_anthropic_errors_and_no_count_tokens(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    user = [{"role": "user", "content": "hi"}]
    for payload, message in (({"model": TINY, "messages": user}, "max_tokens is required and must be positive"),
                             ({"max_tokens": 5, "messages": user}, "model is required"),
                             ({"model": TINY, "max_tokens": 5}, "messages is required")):
        status, headers, lines = emu.post("/v1/messages", payload)
        body = json.loads(b"".join(line for _t, line in lines))
        assert status == 400 and headers["Content-Type"] == "application/json; charset=utf-8"
        assert body["type"] == "error" and body["error"] == {"type": "invalid_request_error", "message": message}
        assert body["request_id"].startswith("req_")
    status, body = emu.post_json("/v1/messages", {"model": "nope", "max_tokens": 5, "messages": user})
    assert status == 404 and body["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
    # Ollama has count_tokens' types (anthropic/anthropic.go) but no route for it
    assert emu.post("/v1/messages/count_tokens", {"model": TINY, "messages": user})[0] == 404


def test_anthropic_tool_use_conversation(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    turn1 = [{"role": "user", "content": "Use tool get_weather for Oslo"}]
    request = {"model": TINY, "max_tokens": 50, "tools": [WEATHER], "messages": turn1}
    status, body = emu.post_json("/v1/messages", request)
    (block,) = body["content"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather" and block["input"] == {"city": "herd", "days": 1}
    assert body["stop_reason"] == "tool_use" and block["id"].startswith("call_")
    messages, tools = emulator.anthropic_request(request)
    call_tokens = emulator.estimate_tokens(emulator.tool_call_text(
        {"function": {"name": "get_weather", "arguments": block["input"]}}))
    assert body["usage"] == {"input_tokens": chat_prompt(messages, tools), "output_tokens": call_tokens}
    status, _headers, lines = emu.post("/v1/messages", dict(request, stream=True))
    events = sse(lines)
    assert [name for name, _data in events] == ["message_start", "content_block_start", "content_block_delta",
                                                "content_block_stop", "message_delta", "message_stop"]
    assert events[1][1]["content_block"]["type"] == "tool_use" and events[1][1]["content_block"]["input"] == {}
    assert json.loads(events[2][1]["delta"]["partial_json"]) == {"city": "herd", "days": 1}
    assert events[4][1]["delta"] == {"stop_reason": "tool_use"}
    turn2 = turn1 + [{"role": "assistant", "content": [block]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "sunny"}]}]
    status, body = emu.post_json("/v1/messages", dict(request, messages=turn2))
    assert body["content"][0]["type"] == "text" and body["stop_reason"] == "end_turn"


def test_openai_chat_tool_call(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    request = {"model": TINY, "tools": [OPENAI_WEATHER], "messages": [{"role": "user", "content": "use tool now"}]}
    status, body = emu.post_json("/v1/chat/completions", request)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == ""
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "herd", "days": 1}
    status, _headers, lines = emu.post("/v1/chat/completions", dict(request, stream=True))
    chunks = [data for _name, data in sse(lines)]
    assert chunks[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chunks[1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
    # the tool's answer gets text
    history = request["messages"] + [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]
    status, body = emu.post_json("/v1/chat/completions", dict(request, messages=history, max_tokens=2))
    assert body["choices"][0]["message"]["content"] == "The herd" and body["choices"][0]["finish_reason"] == "length"


def test_native_tool_conversation_hits_the_slot_cache(start_emulator, lab_models):
    """The tool call is kept in the slot as the next turn renders it: turn 2 evaluates only the tool's result."""
    emu = start_emulator(**fast(lab_models, HERD_EMU_RESPONSE_TOKENS=4))
    tools = [OPENAI_WEATHER]
    turn1 = [{"role": "system", "content": "You are terse. " * 100}, {"role": "user", "content": "use tool please"}]
    status, first = emu.post_json("/api/chat", {"model": TINY, "stream": False, "tools": tools, "messages": turn1})
    message = first["message"]
    assert message["content"] == "" and message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert message["tool_calls"][0]["function"]["arguments"] == {"city": "herd", "days": 1}
    assert first["prompt_eval_count"] == chat_prompt(turn1, tools) and first["done_reason"] == "stop"
    result = {"role": "tool", "content": "sunny", "tool_name": "get_weather"}
    status, second = emu.post_json("/api/chat", {"model": TINY, "stream": False, "tools": tools,
                                                 "messages": turn1 + [message, result]})
    assert second["message"]["content"] == "The herd lab emulator" and "tool_calls" not in second["message"]
    assert second["prompt_eval_count"] == emulator.prompt_len(emulator.message_tokens(result)) + 4
    status, _headers, lines = emu.post("/api/chat", {"model": TINY, "tools": tools, "messages": turn1})
    objs = [json.loads(line) for _t, line in lines]
    assert len(objs) == 2 and objs[0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert objs[1]["done"] is True
