"""The emulator's per-slot prompt cache (Ollama runner's input cache): the slot with the longest common prefix
is taken, only uncached tokens cost prompt-evaluation time and are counted in prompt_eval_count."""

import json

import pytest
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


    assert settings.runner == "llama-server"  # the default, as Ollama 0.30+; this test is the older runner's rule
    runner = emulator.Runner.__new__(emulator.Runner)
    runner.num_parallel, runner.prompt_cache, runner.runner = 3, settings.prompt_cache, "llamarunner"
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
    runner.runner = "llamarunner"  # Ollama 0.3.13-0.29: 0.30 removed OLLAMA_MULTIUSER_CACHE
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


def server_runner(lab_models, slots=3, idle=False, **extra):
    """A llama-server runner's slots and host cache; `idle` turns on --cache-idle-slots (llama-server's default,
    off here so that each test shows one rule)."""
    settings = emulator.Settings({"OLLAMA_NUM_PARALLEL": str(slots), "OLLAMA_MODELS": str(lab_models), **extra})
    runner = emulator.Runner.__new__(emulator.Runner)
    runner.num_parallel, runner.prompt_cache, runner.runner = slots, settings.prompt_cache, settings.runner
    runner.cache_idle_slots = idle and settings.cache_idle_slots
    runner.ram_cache = []
    runner.ram_limit = settings.cache_ram_mib * emulator.MIB if settings.cache_ram_mib > 0 else settings.cache_ram_mib
    runner.kv_bytes_per_token = 128 * emulator.MIB / 1024
    runner.slot_busy = [False] * slots
    return runner


def test_llama_server_picks_by_similarity_and_keeps_prompts_in_host_memory(lab_models):
    """Ollama 0.30+ (llama-server): the free slot sharing the largest fraction of the prompt (over 0.1), else the
    least recently used; a slot given another prompt saves its own in the host-memory cache, and a cached prompt
    that begins the new one better is moved into the slot."""
    runner = server_runner(lab_models)
    assert runner.runner == "llama-server" and runner.ram_limit == 8192 * emulator.MIB
    t = emulator.TEXT

    def p(text):
        return [(t, text)]

    runner.cache_tokens = [p("abcd" * 10 + "XXXX"), p("abcd" * 10 + "YYYYYYYY"), p("zzzz" * 20)]
    runner.cache_used = [1.0, 2.0, 0.5]
    # slot 0 shares 10 of 12 tokens and keeps 10 of its 11: taken as it is, the cache untouched
    assert runner.pick_slot(p("abcd" * 10 + "qqqqqqqq")) == (0, 10) and runner.ram_cache == []
    # nothing shares more than 10%: the least recently used slot (2); its prompt goes to the cache
    assert runner.pick_slot(p("wwww" * 20)) == (2, 0)
    assert runner.ram_cache == [p("zzzz" * 20)]
    # the slot is given the new prompt; later a request for the evicted one finds it in host memory
    runner.cache_tokens[2], runner.cache_used[2] = p("wwww" * 20), 3.0
    runner.slot_busy = [True, True, False]
    assert runner.pick_slot(p("zzzz" * 20 + "more")) == (2, 20)
    assert runner.cache_tokens[2] == p("zzzz" * 20) and runner.ram_cache == [p("wwww" * 20)]
    # that pick copied the slot's prompt out and the cached one in (their KV state: the copy time of the pick)
    assert runner.copied_tokens == emulator.prompt_len(p("wwww" * 20)) + emulator.prompt_len(p("zzzz" * 20))
    # a prompt already held whole by a cached one is not saved twice; one the new prompt holds whole is dropped
    runner._ram_save(p("wwww" * 5))
    runner._ram_save(p("wwww" * 30))
    assert runner.ram_cache == [p("wwww" * 30)]
    # over --cache-ram the oldest prompts leave (one always stays)
    runner.ram_limit = 100 * runner.kv_bytes_per_token
    runner._ram_save(p("kkkk" * 80))
    runner._ram_update()
    assert runner.ram_cache == [p("kkkk" * 80)]
    # LLAMA_ARG_CACHE_RAM=0: no host-memory cache, the slot keeps only what it holds
    off = server_runner(lab_models, slots=1, LLAMA_ARG_CACHE_RAM="0")
    off.cache_tokens, off.cache_used = [p("zzzz" * 20)], [1.0]
    assert off.ram_limit == 0 and off.pick_slot(p("wwww" * 20)) == (0, 0) and off.ram_cache == []
    # OLLAMA_MULTIUSER_CACHE means nothing on this runner (Ollama 0.30 removed it)
    assert server_runner(lab_models, OLLAMA_MULTIUSER_CACHE="1").runner == "llama-server"


def test_llama_server_saves_idle_slots_when_a_request_takes_a_slot(lab_models):
    """--cache-idle-slots (on by default; without a unified KV cache, as Ollama runs llama-server, since llama.cpp
    PR 24190): when a request takes a slot, the prompt of every other idle slot is copied to host memory and stays
    in its slot too. So a session whose slot a session of the same agent takes over (it keeps half or more: no save
    of its own) is still in host memory, and its next turn moves it back when its pick goes by age."""
    t = emulator.TEXT

    def p(text):
        return [(t, text)]

    agent = "aaaa" * 40
    x, y, z = p(agent + "xxxx" * 4), p(agent + "yyyy" * 4), p("zzzz" * 20)
    follow = p(agent + "xxxx" * 4 + "more")
    found = {}
    for idle in (True, False):
        runner = server_runner(lab_models, idle=idle)
        assert runner.cache_idle_slots is idle
        runner.cache_tokens = [x, z, []]
        runner.cache_used = [2.0, 3.0, 0.0]
        runner.slot_busy = [False, True, False]
        # an unrelated request takes the empty slot (by age): slot 0 is idle, so its prompt is copied out
        assert runner.pick_slot(p("vvvv" * 20)) == (2, 0)
        assert runner.ram_cache == ([x] if idle else [])
        assert runner.copied_tokens == (emulator.prompt_len(x) if idle else 0)
        runner.cache_tokens[2], runner.slot_busy = p("vvvv" * 20), [False, False, True]
        # a session of the same agent takes slot 0 (it keeps 40 of its 44 tokens: no save of its own); slot 1 is
        # idle now and is saved; saving again what the cache holds whole copies nothing
        assert runner.pick_slot(y) == (0, 40)
        assert runner.ram_cache == ([x, z] if idle else [])
        runner.cache_tokens[0], runner.slot_busy = y, [True, False, True]
        # the first session's next turn: the only free slot shares nothing, so it goes by age and moves the
        # session's prompt back from host memory (with the cache only; without it, everything is evaluated again)
        found[idle] = runner.pick_slot(follow)
        assert found[idle][0] == 1
    assert found == {True: (1, emulator.prompt_len(x)), False: (1, 0)}
    # the flag's variable in llama.cpp's words: on/enabled/true/1, off/disabled/false/0; the emulator refuses others
    base = {"OLLAMA_MODELS": str(lab_models)}
    assert emulator.Settings(base).cache_idle_slots
    assert not emulator.Settings({**base, "LLAMA_ARG_CACHE_IDLE_SLOTS": "off"}).cache_idle_slots
    assert emulator.Settings({**base, "LLAMA_ARG_CACHE_IDLE_SLOTS": "Enabled"}).cache_idle_slots
    with pytest.raises(SystemExit, match="LLAMA_ARG_CACHE_IDLE_SLOTS"):
        emulator.Settings({**base, "LLAMA_ARG_CACHE_IDLE_SLOTS": "sometimes"})


def test_llama_server_restores_an_evicted_conversation(start_emulator, lab_models):
    emu = start_emulator(**env(lab_models))
    first = chat(emu, HISTORY)
    follow = HISTORY + [first["message"], {"role": "user", "content": "And sheep?"}]
    chat(emu, follow)
    other = [{"role": "user", "content": "Something else entirely. " * 40}]
    chat(emu, other)  # takes the only slot; the conversation goes to host memory
    again = chat(emu, follow)
    assert again["prompt_eval_count"] < 12  # moved back from host memory, not evaluated again
    # the copies cost time on the prefill lane: the conversation's KV state in (herd-tiny: 32 KiB a token) and the
    # other prompt's out, at HERD_EMU_HOST_COPY_MB_PER_SECOND
    kept = emulator.prompt_len(emulator.chat_kept_tokens(emulator.chat_tokens(follow), first["message"]["content"]))
    fast = again["prompt_eval_duration"] / 1e9
    assert fast < 0.1
    slow_emu = start_emulator(**env(lab_models, HERD_EMU_HOST_COPY_MB_PER_SECOND="50"))
    chat(slow_emu, HISTORY)
    chat(slow_emu, follow)
    chat(slow_emu, other)
    slow = chat(slow_emu, follow)
    assert slow["prompt_eval_count"] < 12
    assert slow["prompt_eval_duration"] / 1e9 >= 0.9 * kept * 32 * 1024 / 50e6 > 5 * fast
    emu = start_emulator(**env(lab_models, LLAMA_ARG_CACHE_RAM="0"))
    chat(emu, follow)
    chat(emu, other)
    assert chat(emu, follow)["prompt_eval_count"] == emulator.prompt_len(emulator.chat_tokens(follow))


def test_follow_up_turn_is_cached_in_its_slot(start_emulator, lab_models):
    emu = start_emulator(**env(lab_models, HERD_EMU_RUNNER="llamarunner"))
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
