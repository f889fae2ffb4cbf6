"""The emulator's timing model (docs/standins.md "Timing model"): decode speed follows the measured batch curve
T(B), HERD_EMU_BUSY_SLOWDOWN keeps the old linear rule, prompts are evaluated in chunks on one lane per runner that
hold up the generating slots, the prompt rate follows the parameter count and a cold load the size over the disk."""

import concurrent.futures
import hashlib
import json
import time
from types import SimpleNamespace

import pytest
from standins_lab import GPUS, emulator, mkmodels

L20 = str(GPUS / "l20x4.json")
CURVE = emulator.BATCH_STEP_RATIOS
T = {1: 1.0, 2: 2 * 79.04 / 136.37, 4: 4 * 79.04 / 224.52}  # PR #16894's S_TG figures, as the docs cite them


def env(models, **extra):
    base = {"OLLAMA_MODELS": models, "HERD_LAB_GPU_SPEC": L20, "CUDA_VISIBLE_DEVICES": "0",
            "HERD_EMU_LOAD_SECONDS": "0.05", "HERD_EMU_TOKENS_PER_SECOND": "200",
            "HERD_EMU_PROMPT_TOKENS_PER_SECOND": "1000000"}
    base.update({key: str(value) for key, value in extra.items()})
    return {key: value for key, value in base.items() if value != "None"}


def generate(emu, prompt, n_tokens, model="herd-tiny:1b"):
    status, body = emu.post_json("/api/generate", {"model": model, "prompt": prompt, "stream": False,
                                                   "options": {"num_predict": n_tokens}})
    assert status == 200, body
    return body


def together(emu, jobs):
    """Run (delay, prompt, n_tokens) jobs at once, each after its delay; their final answers in order."""
    def run(job):
        time.sleep(job[0])
        return generate(emu, job[1], job[2])

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


def eval_rate(body):
    return body["eval_count"] / (body["eval_duration"] / 1e9)


def test_step_ratio_table_and_override():
    assert emulator.step_ratio(CURVE, 1) == 1.0
    for batch, ratio in T.items():
        assert emulator.step_ratio(CURVE, batch) == pytest.approx(ratio)
    assert emulator.step_ratio(CURVE, 3) == pytest.approx((T[2] + T[4]) / 2)  # linear between points
    # past B=4: PR #3776's growth (S_TG 265.14, 450.38, 604.89, 796.67 at 4, 8, 16, 32); flat past 32
    t8 = T[4] * 2 * 265.14 / 450.38
    t32 = t8 * 2 * 450.38 / 604.89 * 2 * 604.89 / 796.67
    assert emulator.step_ratio(CURVE, 8) == pytest.approx(t8) and emulator.step_ratio(CURVE, 32) == pytest.approx(t32)
    assert emulator.step_ratio(CURVE, 64) == pytest.approx(t32)
    assert emulator.parse_step_ratios([[8, 3.0], [2, 1.5]]) == ((1.0, 1.0), (2.0, 1.5), (8.0, 3.0))
    assert emulator.parse_step_ratios({"1": 1, "4": 2}) == ((1.0, 1.0), (4.0, 2.0))
    for bad in (None, [], [[0, 1]], [[2, -1]], [["x", 1]], "1:1"):
        assert emulator.parse_step_ratios(bad) is CURVE


def test_token_rate_curve_and_linear_rule():
    runner = emulator.Runner.__new__(emulator.Runner)
    runner.model = SimpleNamespace(tokens_per_second=100.0, busy_slowdown=None, batch_step_ratios=CURVE)
    runner.rate_factor, runner.num_parallel, runner.active = 1.0, 4, 4
    for batch in (1, 2, 4):
        runner.generating = batch
        assert runner.token_rate() == pytest.approx(100 / T[batch])
    runner.model.busy_slowdown = 0.8  # HERD_EMU_BUSY_SLOWDOWN: the slots taken, linear to 0.8 with all 4
    assert runner.token_rate() == pytest.approx(80)
    runner.active = 2
    assert runner.token_rate() == pytest.approx(100 * (1 - 0.2 / 3))


def test_decode_rates_follow_the_curve(start_emulator, lab_models):
    """B slots generating at once: each at 200 / T(B), the runner at B x that (measured over HTTP)."""
    emu = start_emulator(**env(lab_models, OLLAMA_NUM_PARALLEL=4))
    generate(emu, "", 1)  # load
    for batch in (1, 2, 4):
        answers = together(emu, [(0, "hi", 60)] * batch)
        per_slot = [eval_rate(a) for a in answers]
        expected = 200 / T[batch]
        assert all(a["eval_count"] == 60 for a in answers)
        assert sum(per_slot) / batch == pytest.approx(expected, rel=0.1), (batch, per_slot)
        assert sum(per_slot) == pytest.approx(batch * expected, rel=0.1), (batch, per_slot)


def test_busy_slowdown_env_keeps_the_linear_rule(start_emulator, lab_models):
    emu = start_emulator(**env(lab_models, OLLAMA_NUM_PARALLEL=4, HERD_EMU_BUSY_SLOWDOWN=0.5))
    generate(emu, "", 1)
    assert eval_rate(generate(emu, "hi", 60)) == pytest.approx(200, rel=0.1)
    busy = [eval_rate(a) for a in together(emu, [(0, "hi", 60)] * 4)]
    assert sum(busy) / 4 == pytest.approx(200 * 0.5, rel=0.12), busy


def test_prefill_holds_up_a_generating_slot(start_emulator, lab_models):
    """While another slot evaluates a prompt (0.4 s in 512-token chunks), a generating slot gets one token per chunk."""
    emu = start_emulator(**env(lab_models, OLLAMA_NUM_PARALLEL=2, HERD_EMU_PROMPT_TOKENS_PER_SECOND=20000))
    generate(emu, "", 1)
    alone = generate(emu, "hi", 100)["eval_duration"] / 1e9  # 0.5 s
    long_prompt = "x" * 32000
    gen, pre = together(emu, [(0, "hi there", 100), (0.1, long_prompt, 1)])
    prompt_s = pre["prompt_eval_duration"] / 1e9
    # all of it but the template's first tokens, which the instance's earlier prompts share
    assert emulator.estimate_tokens(long_prompt) <= pre["prompt_eval_count"] <= emulator.estimate_tokens(long_prompt) + 8
    assert prompt_s == pytest.approx(pre["prompt_eval_count"] / 20000, rel=0.15)
    # about prompt_s - (its 16 chunks' tokens) / 200 longer: ~0.3 s
    assert gen["eval_duration"] / 1e9 - alone > 0.2, (alone, gen["eval_duration"], prompt_s)
    assert gen["eval_count"] == 100


def test_concurrent_prefills_share_the_prompt_rate(start_emulator, lab_models):
    emu = start_emulator(**env(lab_models, OLLAMA_NUM_PARALLEL=2, HERD_EMU_PROMPT_TOKENS_PER_SECOND=20000))
    generate(emu, "", 1)
    alone = generate(emu, "a" * 32000, 1)["prompt_eval_duration"]  # 0.4 s
    both = together(emu, [(0, "b" * 32000, 1), (0, "c" * 32000, 1)])
    ratios = [b["prompt_eval_duration"] / alone for b in both]
    assert all(1.6 < r < 2.4 for r in ratios), ratios  # chunks take turns: 31/16 and 32/16 of one alone


def _write_cold_model(root, **lab):
    """herd-cold:1b: herd-tiny's files with `lab` in its herd_lab, without load_seconds and prompt_tokens_per_second."""
    manifest_bytes, blobs = mkmodels.model_files("herd-tiny:1b", mkmodels.MODELS["herd-tiny:1b"])
    manifest = json.loads(manifest_bytes)
    config = json.loads(blobs.pop(manifest["config"]["digest"].split(":")[1]))
    for key in ("load_seconds", "prompt_tokens_per_second"):
        del config["herd_lab"][key]
    config["herd_lab"].update(lab)
    data = json.dumps(config).encode()
    digest = hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    manifest["config"].update(digest="sha256:" + digest, size=len(data))
    (root / "blobs").mkdir(parents=True)
    for name, blob in blobs.items():
        (root / "blobs" / f"sha256-{name}").write_bytes(blob)
    path = root / "manifests" / "registry.ollama.ai" / "library" / "herd-cold" / "1b"
    path.parent.mkdir(parents=True)
    path.write_bytes(json.dumps(manifest).encode())
    return path, json.dumps(manifest).encode(), config


def test_prompt_rate_from_parameter_count_and_load_from_size(tmp_path):
    k = emulator.PREFILL_PARAMS_TOKENS_PER_SECOND
    assert emulator.prompt_rate_for(6.74e9) == pytest.approx(7979.85)
    assert emulator.prompt_rate_for(1e9) == pytest.approx(k / 1e9)
    assert emulator.prompt_rate_for(0) == emulator.DEFAULT_PROMPT_TOKENS_PER_SECOND
    path, manifest, config = _write_cold_model(tmp_path, parameter_count=2_000_000_000, vram_mib=1000)

    def info(environ, **lab):
        cfg = json.loads(json.dumps(config))
        cfg["herd_lab"].update(lab)
        return emulator.ModelInfo("herd-cold:1b", str(path), manifest, cfg, emulator.Settings(environ))

    model = info({})
    assert model.prompt_tokens_per_second == pytest.approx(k / 2e9)
    assert model.load_seconds == pytest.approx(1000 * 1024**2 / 3000e6)  # the default 3000 MB/s
    model = info({"HERD_EMU_DISK_MB_PER_SECOND": "500"})
    assert model.load_seconds == pytest.approx(1000 * 1024**2 / 500e6)
    model = info({"HERD_EMU_PROMPT_TOKENS_PER_SECOND": "123", "HERD_EMU_LOAD_SECONDS": "0.5"})
    assert (model.prompt_tokens_per_second, model.load_seconds) == (123, 0.5)
    model = info({"HERD_EMU_DISK_MB_PER_SECOND": "500"}, prompt_tokens_per_second=77, load_seconds=2)
    assert (model.prompt_tokens_per_second, model.load_seconds) == (77, 2)  # stated: as before
    assert info({}, batch_step_ratios=[[2, 1.9]]).batch_step_ratios == ((1.0, 1.0), (2.0, 1.9))
    assert info({}).busy_slowdown is None and info({"HERD_EMU_BUSY_SLOWDOWN": "0.7"}).busy_slowdown == 0.7


def test_cold_load_and_prompt_rate_over_http(start_emulator, tmp_path):
    """A model without load_seconds loads in vram_mib / disk rate; without a prompt rate evaluates at K / params."""
    models = tmp_path / "cold-models"
    _write_cold_model(models, parameter_count=6_740_000_000, vram_mib=600)
    emu = start_emulator(**env(str(models), HERD_EMU_LOAD_SECONDS=None, HERD_EMU_PROMPT_TOKENS_PER_SECOND=None,
                               HERD_EMU_DISK_MB_PER_SECOND=1000))
    answer = generate(emu, "y" * 4000, 1, model="herd-cold:1b")  # the first request loads the model
    assert answer["load_duration"] / 1e9 == pytest.approx(600 * 1024**2 / 1000e6, rel=0.15)  # 0.63 s
    assert answer["prompt_eval_count"] == emulator.estimate_tokens("y" * 4000) + 8
    assert answer["prompt_eval_duration"] / 1e9 == pytest.approx(answer["prompt_eval_count"] / 7979.85, rel=0.15)


@pytest.mark.parametrize("path,doc", [
    ("/api/chat", {"messages": [{"role": "user", "content": "y" * 8000}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "y" * 8000}]}),
    ("/v1/responses", {"input": "y" * 8000}),
    ("/v1/messages", {"max_tokens": 4, "messages": [{"role": "user", "content": "y" * 8000}]}),
])
def test_a_stream_starts_with_its_first_token(start_emulator, lab_models, path, doc):
    """As Ollama's handlers: nothing of a streamed answer (status line, message_start, response.created) comes
    before the prompt is evaluated: 2000 tokens at 4000 tokens/s, 0.5 s."""
    emu = start_emulator(**env(lab_models, HERD_EMU_PROMPT_TOKENS_PER_SECOND=4000))
    generate(emu, "", 1)
    conn = emu.conn()
    try:
        sent = time.monotonic()
        conn.request("POST", path, body=json.dumps({"model": "herd-tiny:1b", "stream": True, **doc}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        status_s = time.monotonic() - sent
        first = resp.readline()
        first_s = time.monotonic() - sent
        rest = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, rest
    assert status_s >= 0.45 and first_s >= 0.45, (status_s, first_s, first)
    opening = {"/v1/responses": b"event: response.created", "/v1/messages": b"event: message_start"}.get(path)
    assert opening is None or first.startswith(opening), first
