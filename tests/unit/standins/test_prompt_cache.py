"""The emulator's per-slot prompt cache (Ollama runner's input cache): the slot with the longest common prefix
is taken, only uncached tokens cost prompt-evaluation time and are counted in prompt_eval_count."""

import json

from standins_lab import GPUS, emulator

L20 = str(GPUS / "l20x4.json")
HISTORY = [{"role": "system", "content": "You are terse. " * 200},
           {"role": "user", "content": "Tell me about herds of goats, in detail."}]


def env(lab_models, **extra):
    base = {"OLLAMA_MODELS": lab_models, "HERD_LAB_GPU_SPEC": L20, "CUDA_VISIBLE_DEVICES": "0",
            "HERD_EMU_LOAD_SECONDS": "0.05", "HERD_EMU_TOKENS_PER_SECOND": "400",
            "HERD_EMU_PROMPT_TOKENS_PER_SECOND": "2000", "HERD_EMU_RESPONSE_TOKENS": "8"}
    base.update(extra)
    return base


def chat(emu, messages):
    status, body = emu.post_json("/api/chat", {"model": "herd-tiny:1b", "stream": False, "messages": messages})
    assert status == 200, body
    return body


def test_token_model_matches_the_counts():
    msgs = HISTORY + [{"role": "assistant", "content": "ok"}, "not a message", {"role": "user", "content": ""}]
    tokens = emulator.chat_tokens(msgs)
    expected = sum(emulator.estimate_tokens(str(m.get("content") or "")) + 4 for m in msgs if isinstance(m, dict))
    assert emulator.prompt_len(tokens) == expected + 4
    assert emulator.prompt_len(emulator.generate_tokens("sys", "hello world")) == (
        emulator.estimate_tokens("syshello world") + 8)
    text, mark = emulator.TEXT, emulator.MARK
    # 4-byte tokens: "abcd" "efgh" shared, "ijkl" vs "ijkX" not; a marker counts 4
    assert emulator.common_prefix([(mark, "user"), (text, "abcdefghijkl")], [(mark, "user"), (text, "abcdefghijkX")]) == 6
    assert emulator.common_prefix([(mark, "user"), (text, "abc")], [(mark, "user"), (text, "abc"), (mark, "x")]) == 5
    assert emulator.common_prefix([(mark, "user")], [(mark, "system")]) == 0
    assert emulator.common_prefix([], [(text, "a")]) == 0
    big = "x" * 1048576
    assert emulator.common_prefix([(text, big)], [(text, big[:-1] + "y")]) == 262143


def test_pick_slot_longest_prefix_then_least_recently_used(lab_models):
    settings = emulator.Settings({"OLLAMA_NUM_PARALLEL": "3", "OLLAMA_MODELS": str(lab_models)})


    runner = emulator.Runner.__new__(emulator.Runner)
    runner.num_parallel, runner.prompt_cache = 3, settings.prompt_cache
    t = emulator.TEXT

    def p(text):
        return [(t, text)]

    runner.cache_tokens = [p("abcdXXXX"), p("abcdefghijkl"), p("zzzz")]
    runner.cache_used = [1.0, 2.0, 0.5]
    runner.slot_busy = [False, False, False]
    assert runner.pick_slot(p("abcdefghijkq")) == (1, 2)
    assert runner.pick_slot(p("abcdefghijkl")) == (1, 2)  # a whole cached prompt still evaluates its last token
    runner.slot_busy[1] = True
    assert runner.pick_slot(p("abcdefghijkq")) == (0, 1)
    assert runner.pick_slot(p("qqqq")) == (2, 0)  # no prefix anywhere: least recently used
    runner.prompt_cache = False
    assert runner.pick_slot(p("abcdefghijkq")) == (2, 0)


def test_multiuser_cache_forks_a_busy_slots_prefix(lab_models):
    """OLLAMA_MULTIUSER_CACHE (the runner's findBestCacheSlot): the longest prefix of any slot, busy ones included,
    is copied into the least recently used free slot; a free slot whose whole cache begins the prompt is reused."""
    settings = emulator.Settings({"OLLAMA_NUM_PARALLEL": "3", "OLLAMA_MODELS": str(lab_models),
                                  "OLLAMA_MULTIUSER_CACHE": "1"})
    assert settings.multiuser_cache and not emulator.Settings({"OLLAMA_MODELS": str(lab_models)}).multiuser_cache
    runner = emulator.Runner.__new__(emulator.Runner)
    runner.num_parallel, runner.prompt_cache, runner.multiuser_cache = 3, True, settings.multiuser_cache
    t = emulator.TEXT

    def p(text):
        return [(t, text)]

    runner.cache_tokens = [p("abcdefgh"), p("zzzz"), p("abcdXXXX")]
    runner.cache_used = [3.0, 1.0, 2.0]
    runner.slot_busy = [True, False, False]
    # slot 0 (busy) holds the longest prefix (2 tokens): forked into the least recently used free slot, 1
    assert runner.pick_slot(p("abcdefghijkl")) == (1, 2)
    runner.multiuser_cache = False  # the default: the longest prefix among free slots only (slot 2, 1 token)
    assert runner.pick_slot(p("abcdefghijkl")) == (2, 1)
    runner.multiuser_cache = True
    runner.cache_tokens[2] = p("abcd")  # free, and its whole cache begins the prompt: reused as it is
    runner.slot_busy[0] = False
    runner.cache_tokens[0] = p("qqqq")
    assert runner.pick_slot(p("abcdefgh")) == (2, 1)


def test_follow_up_turn_is_cached_in_its_slot(start_emulator, lab_models):
    emu = start_emulator(**env(lab_models))
    first = chat(emu, HISTORY)
    full = emulator.prompt_len(emulator.chat_tokens(HISTORY))
    assert first["prompt_eval_count"] == full
    assert first["prompt_eval_duration"] >= full / 2000 * 1e9 * 0.9
    follow = HISTORY + [first["message"], {"role": "user", "content": "And sheep?"}]
    second = chat(emu, follow)
    new = emulator.prompt_len(emulator.chat_tokens(follow)) - emulator.prompt_len(
        emulator.chat_kept_tokens(emulator.chat_tokens(HISTORY), first["message"]["content"]))
    assert second["prompt_eval_count"] == new < 12
    assert second["prompt_eval_duration"] < first["prompt_eval_duration"] / 10
    # another conversation on the only slot evicts it: the next turn of the first pays in full again
    other = chat(emu, [{"role": "user", "content": "Something else entirely. " * 40}])
    assert other["prompt_eval_count"] == emulator.prompt_len(emulator.chat_tokens(
        [{"role": "user", "content": "Something else entirely. " * 40}]))
    again = chat(emu, follow)
    assert again["prompt_eval_count"] == emulator.prompt_len(emulator.chat_tokens(follow))


def test_cache_off_and_generate_and_openai(start_emulator, lab_models):
    emu = start_emulator(**env(lab_models, HERD_EMU_PROMPT_CACHE="0"))
    assert chat(emu, HISTORY)["prompt_eval_count"] == chat(emu, HISTORY)["prompt_eval_count"]
    emu = start_emulator(**env(lab_models))
    prompt = {"model": "herd-tiny:1b", "prompt": "word " * 400, "stream": False}
    a = emu.post_json("/api/generate", prompt)[1]
    b = emu.post_json("/api/generate", prompt)[1]
    assert a["prompt_eval_count"] == emulator.estimate_tokens("word " * 400) + 8 and b["prompt_eval_count"] == 1
    status, _h, lines = emu.post("/v1/chat/completions", {"model": "herd-tiny:1b", "messages": HISTORY,
                                                          "stream": True})
    assert status == 200 and lines and json.loads(lines[0][1][len("data: "):])["object"] == "chat.completion.chunk"
    t0 = chat(emu, HISTORY)  # the OpenAI request left HISTORY (and its answer) in a slot
    assert t0["prompt_eval_count"] == 4  # only the tokens that open the answer
