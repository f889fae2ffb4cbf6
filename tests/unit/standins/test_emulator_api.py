"""The Ollama emulator as a process: endpoints, JSON shapes, scheduling, keep-alive, VRAM, pull."""

import concurrent.futures
import json
import shutil
import time

import pytest
from standins_lab import GPUS, emulator

ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
FINAL_FIELDS = {"model", "created_at", "done", "done_reason", "total_duration", "load_duration",
                "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"}
L20 = str(GPUS / "l20x4.json")
RTX = str(GPUS / "rtx4090x8.json")


def fast(lab_models, **env):
    base = {"OLLAMA_MODELS": lab_models, "HERD_LAB_GPU_SPEC": L20, "CUDA_VISIBLE_DEVICES": "0",
            "HERD_EMU_LOAD_SECONDS": "0.05", "HERD_EMU_TOKENS_PER_SECOND": "400"}
    base.update(env)
    return base


def test_health_version_tags(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    assert emu.get("/") == (200, b"Ollama is running")
    assert emu.get("/", method="HEAD") == (200, b"")
    version = emu.get_json("/api/version")["version"]
    assert version.endswith("-herd-emulator") and version.split("-")[0].count(".") == 2
    tags = emu.get_json("/api/tags")["models"]
    assert sorted(m["name"] for m in tags) == ["herd-embed:v1", "herd-large:70b", "herd-small:7b", "herd-small:latest",
                                             "herd-tiny:1b"]
    # two tags of one manifest (Ollama's library tags `latest` so): one digest
    small = {m["name"]: m["digest"] for m in tags if m["name"].startswith("herd-small:")}
    assert small["herd-small:latest"] == small["herd-small:7b"]
    tiny = next(m for m in tags if m["name"] == "herd-tiny:1b")
    assert set(tiny) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert tiny["details"]["parameter_size"] == "1.2B" and tiny["details"]["quantization_level"] == "Q4_K_M"
    assert len(tiny["digest"]) == 64
    assert emu.get("/api/nope")[0] == 404
    assert "herd LAB STAND-IN" in emu.log() and "NOT Ollama" in emu.log()


def test_show_and_unknown_model(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    status, body = emu.post_json("/api/show", {"model": "herd-small:7b"})
    assert status == 200
    assert body["details"]["family"] == "qwen2"
    assert body["model_info"]["general.architecture"] == "qwen2"
    assert body["capabilities"] == ["completion", "tools"]  # the lab template renders .Tools
    assert emu.post_json("/api/generate", {"model": "nope:1b", "prompt": "x"}) == (
        404, {"error": "model 'nope:1b' not found"})
    assert emu.post_json("/api/chat", {"model": "nope", "messages": []})[0] == 404
    assert emu.post_json("/api/generate", {"prompt": "x"}) == (400, {"error": "model is required"})


def test_generate_stream_shapes(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    status, headers, lines = emu.post("/api/generate", {"model": "herd-tiny:1b", "prompt": "hello",
                                                        "options": {"num_predict": 6}})
    assert status == 200
    assert headers["Content-Type"] == "application/x-ndjson"
    assert headers["Transfer-Encoding"] == "chunked"
    objs = [json.loads(line) for _t, line in lines]
    assert len(objs) == 7
    for obj in objs[:-1]:
        assert set(obj) == {"model", "created_at", "response", "done"}
        assert obj["done"] is False and obj["model"] == "herd-tiny:1b"
        assert obj["created_at"].endswith("Z") and obj["created_at"][10] == "T"
    final = objs[-1]
    assert FINAL_FIELDS <= set(final) and final["done"] is True and final["response"] == ""
    assert final["done_reason"] == "length" and final["eval_count"] == 6
    assert all(isinstance(final[key], int) and final[key] > 0 for key in FINAL_FIELDS
               if key.endswith(("_duration", "_count")))
    assert final["total_duration"] >= final["load_duration"] + final["eval_duration"] * 0.9
    assert "".join(o["response"] for o in objs[:-1]).split()[0] == "The"


def test_generate_no_stream_and_chat_shapes(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, HERD_EMU_RESPONSE_TOKENS=5))
    status, body = emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": "hi", "stream": False})
    assert status == 200 and body["done"] is True and body["done_reason"] == "stop"
    assert len(body["response"].split()) == 5 and body["eval_count"] == 5
    status, headers, lines = emu.post("/api/chat", {"model": "herd-tiny:1b",
                                                    "messages": [{"role": "user", "content": "hi"}]})
    objs = [json.loads(line) for _t, line in lines]
    assert status == 200 and len(objs) == 6
    assert objs[0]["message"] == {"role": "assistant", "content": "The"}
    assert set(objs[0]) == {"model", "created_at", "message", "done"}
    assert FINAL_FIELDS <= set(objs[-1]) and objs[-1]["message"] == {"role": "assistant", "content": ""}
    status, body = emu.post_json("/api/chat", {"model": "herd-tiny:1b", "stream": False,
                                               "messages": [{"role": "user", "content": "hi"}]})
    assert body["message"]["content"].startswith("The herd") and body["done_reason"] == "stop"


def test_openai_chat_completions(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    request = {"model": "herd-tiny:1b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    status, body = emu.post_json("/v1/chat/completions", request)
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    status, headers, lines = emu.post("/v1/chat/completions", dict(request, stream=True,
                                                                   stream_options={"include_usage": True}))
    assert headers["Content-Type"] == "text/event-stream"
    events = [line for _t, line in lines if line]
    assert all(line.startswith(b"data: ") for line in events)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 5
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "length"]
    assert chunks[0]["choices"][0]["delta"]["content"] == "The"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    status, body = emu.post_json("/v1/chat/completions", dict(request, model="nope"))
    assert status == 404 and body["error"]["type"] == "not_found_error"


def _overlap(intervals):
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _when, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def test_slot_limit_honoured(start_emulator, lab_models):
    """NUM_PARALLEL=2: of 6 concurrent streams at most 2 generate at once, and 2 really do."""
    emu = start_emulator(**fast(lab_models, OLLAMA_NUM_PARALLEL=2, HERD_EMU_TOKENS_PER_SECOND=60))
    assert emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": ""})[1]["done_reason"] == "load"
    request = {"model": "herd-tiny:1b", "prompt": "hi", "options": {"num_predict": 12}}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: emu.post("/api/generate", request), range(6)))
    intervals = []
    for status, _headers, lines in results:
        assert status == 200 and len(lines) == 13
        intervals.append((lines[0][0], lines[-1][0]))
    assert _overlap(intervals) == 2
    starts = sorted(start for start, _ in intervals)
    # three waves of two: the 3rd and 5th streams start only after earlier ones finished
    assert starts[2] - starts[0] > 0.12 and starts[4] - starts[2] > 0.12


def test_busy_slots_generate_slower(start_emulator, lab_models):
    # HERD_EMU_BUSY_SLOWDOWN: the old linear rule (the default batch curve is tested in test_timing.py)
    emu = start_emulator(**fast(lab_models, OLLAMA_NUM_PARALLEL=4, HERD_EMU_TOKENS_PER_SECOND=100,
                                HERD_EMU_BUSY_SLOWDOWN=0.8))
    request = {"model": "herd-tiny:1b", "prompt": "hi", "stream": False, "options": {"num_predict": 20}}
    alone = emu.post_json("/api/generate", request)[1]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        busy = list(pool.map(lambda _: emu.post_json("/api/generate", request)[1], range(4)))
    rate_alone = alone["eval_count"] / (alone["eval_duration"] / 1e9)
    rate_busy = sum(b["eval_count"] / (b["eval_duration"] / 1e9) for b in busy) / 4
    assert 90 < rate_alone < 105
    assert 0.7 < rate_busy / rate_alone < 0.92  # 0.8 x with all 4 slots busy


def test_queue_overflow_503(start_emulator, lab_models):
    """As in server/sched.go: while a model loads the scheduler is blocked, OLLAMA_MAX_QUEUE requests wait
    in the pending queue, one is held by the scheduler, one is loading; every further request gets 503."""
    emu = start_emulator(**fast(lab_models, OLLAMA_MAX_QUEUE=2, HERD_EMU_LOAD_SECONDS=1.5))
    request = {"model": "herd-tiny:1b", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}

    def send(index):
        # 50 ms apart, all within the load: the scheduler takes the first (it loads) and the second (it waits for
        # the load) before the next come, as Ollama's scheduler goroutine does at once; sent in the same instant,
        # a busy machine could run their handlers before the emulator's scheduler task had its turn
        time.sleep(0.05 * index)
        return emu.post_json("/api/generate", request)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(8)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 4 + [503] * 4
    assert all(body == {"error": ERR_MAX_QUEUE} for status, body in results if status == 503)


def test_loaded_model_waits_for_slots_without_503(start_emulator, lab_models):
    """Ollama waits for a busy runner's slot outside the pending queue: no 503 once the model is loaded."""
    emu = start_emulator(**fast(lab_models, OLLAMA_MAX_QUEUE=1, OLLAMA_NUM_PARALLEL=1))
    emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": ""})
    request = {"model": "herd-tiny:1b", "prompt": "hi", "stream": False, "options": {"num_predict": 10}}
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        statuses = [status for status, _ in pool.map(lambda _: emu.post_json("/api/generate", request), range(5))]
    assert statuses == [200] * 5


def test_keep_alive_zero_unloads_and_expiry(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models))
    base = {"model": "herd-tiny:1b", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    assert emu.post_json("/api/generate", dict(base, keep_alive=0))[0] == 200
    assert emu.get_json("/api/ps")["models"] == []
    assert emu.post_json("/api/generate", dict(base, keep_alive="1s"))[0] == 200
    ps = emu.get_json("/api/ps")["models"]
    assert [m["name"] for m in ps] == ["herd-tiny:1b"]
    # weights 1536 MiB + KV 1 slot x 8192 tokens (32768 on a 45 GiB L20, capped at the model's 8192) x 32 MiB/1k
    assert ps[0]["size"] == (1536 + 256) * 1024 * 1024 == ps[0]["size_vram"]
    assert set(ps[0]) >= {"name", "model", "size", "digest", "details", "expires_at", "size_vram"}
    time.sleep(1.4)
    assert emu.get_json("/api/ps")["models"] == []
    emu.post_json("/api/generate", dict(base, keep_alive=-1))
    expires = emu.get_json("/api/ps")["models"][0]["expires_at"]
    assert int(expires[:4]) > 2200  # "forever" is now + MaxInt64 ns, as in Ollama
    status, body = emu.post_json("/api/generate", {"model": "herd-tiny:1b", "keep_alive": 0})
    assert (status, body["done_reason"]) == (200, "unload")
    assert emu.get_json("/api/ps")["models"] == []
    status, body = emu.post_json("/api/chat", {"model": "herd-tiny:1b", "messages": []})
    assert body["done_reason"] == "load" and body["message"]["role"] == "assistant"
    assert [m["name"] for m in emu.get_json("/api/ps")["models"]] == ["herd-tiny:1b"]


def test_keep_alive_env_default(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, OLLAMA_KEEP_ALIVE="0"))
    emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": "hi", "stream": False,
                                    "options": {"num_predict": 1}})
    assert emu.get_json("/api/ps")["models"] == []
    emu = start_emulator(**fast(lab_models, OLLAMA_KEEP_ALIVE="-1"))
    emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": ""})
    assert int(emu.get_json("/api/ps")["models"][0]["expires_at"][:4]) > 2200


def test_max_loaded_models_evicts(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, OLLAMA_MAX_LOADED_MODELS=1))
    emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": ""})
    emu.post_json("/api/generate", {"model": "herd-small:7b", "prompt": ""})
    assert [m["name"] for m in emu.get_json("/api/ps")["models"]] == ["herd-small:7b"]


def test_vram_refusal_and_gpu_selection(start_emulator, lab_models):
    one = start_emulator(**fast(lab_models, HERD_LAB_GPU_SPEC=RTX, CUDA_VISIBLE_DEVICES="0"))
    status, body = one.post_json("/api/generate", {"model": "herd-large:70b", "prompt": ""})
    assert status == 500
    # 43008 MiB weights + KV 1 x 4096 tokens (Ollama's default under 24 GiB) x 320 MiB/1k = 44288 MiB
    assert body == {"error": "model requires more system memory (43.2 GiB) than is available (24.0 GiB)"}
    assert one.get_json("/api/ps")["models"] == []
    uuids = [gpu["uuid"] for gpu in json.loads(open(RTX).read())["gpus"]]
    two = start_emulator(**fast(lab_models, HERD_LAB_GPU_SPEC=RTX, CUDA_VISIBLE_DEVICES=f"{uuids[2]},{uuids[3]}"))
    status, body = two.post_json("/api/generate", {"model": "herd-large:70b", "prompt": ""})
    assert (status, body["done_reason"]) == (200, "load")
    # two 4090s (48.0 GiB, just under 48): 32768 tokens capped at the model's 8192 -> KV 2560 MiB
    assert two.get_json("/api/ps")["models"][0]["size_vram"] == (43008 + 2560) * 1024 * 1024
    assert uuids[2] in two.log() and uuids[3] in two.log() and uuids[0] not in two.log()
    cpu = start_emulator(**fast(lab_models, HERD_LAB_GPU_SPEC=RTX, CUDA_VISIBLE_DEVICES="-1"))
    cpu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": ""})
    assert cpu.get_json("/api/ps")["models"][0]["size_vram"] == 0


def test_ollama_host_with_scheme_and_slash(start_emulator, lab_models, tmp_path):
    from standins_lab import free_port

    port = free_port()
    emu = start_emulator(port=port, **fast(lab_models, OLLAMA_HOST=f"http://127.0.0.1:{port}/"))
    assert emu.get("/api/version")[0] == 200
    assert f"Listening on 127.0.0.1:{port} " in emu.log()


def _pull(emu, name, insecure=False):
    status, _headers, lines = emu.post("/api/pull", {"model": name, "insecure": insecure})
    return status, [json.loads(line) for _t, line in lines]


def test_pull_from_a_registry_copy_and_delete(start_emulator, start_registry, lab_models, tmp_path):
    registry = start_registry(lab_models)
    store = tmp_path / "store"
    emu = start_emulator(**fast(str(store)))
    assert emu.get_json("/api/tags")["models"] == []
    name = f"127.0.0.1:{registry.port}/library/herd-tiny:1b"
    status, events = _pull(emu, name)
    # Over https unless the request says insecure, as Ollama: the lab registry speaks plain http.
    assert status == 200 and events[-1]["error"].startswith("pull model manifest: Get ")
    status, events = _pull(emu, name, insecure=True)
    assert status == 200
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == ["verifying sha256 digest", "writing manifest",
                                                                   "success"]
    layer_events = [e for e in events if e["status"].startswith("pulling ") and "digest" in e]
    assert all(e["status"] == "pulling " + e["digest"][7:19] for e in layer_events)
    assert any(e.get("completed") == e["total"] for e in layer_events)
    # Stored and listed under the name pulled, registry host and port included (as Ollama does).
    assert [m["name"] for m in emu.get_json("/api/tags")["models"]] == [name]
    src = lab_models / "manifests/registry.ollama.ai/library/herd-tiny/1b"
    pulled = store / f"manifests/127.0.0.1:{registry.port}/library/herd-tiny/1b"
    # Written as Ollama writes a pulled manifest: its struct marshalled again (test_real_contract.py compares).
    assert pulled.read_bytes() == emulator.go_manifest_bytes(json.loads(src.read_bytes()))
    assert json.loads(pulled.read_bytes()) == json.loads(src.read_bytes())
    # a second pull finds every blob present and verified
    status, events = _pull(emu, name, insecure=True)
    assert events[-1] == {"status": "success"}
    pulled_bytes = pulled.read_bytes()
    # /api/copy gives it the plain name; deleting the pulled name keeps the blobs the copy references.
    assert emu.post("/api/copy", {"source": name, "destination": "herd-tiny:1b"})[0] == 200
    assert emu.post("/api/delete", {"model": name}, method="DELETE")[0] == 200
    assert [m["name"] for m in emu.get_json("/api/tags")["models"]] == ["herd-tiny:1b"]
    assert (store / "manifests/registry.ollama.ai/library/herd-tiny/1b").read_bytes() == pulled_bytes
    assert emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": ""})[0] == 200
    status, events = _pull(emu, f"127.0.0.1:{registry.port}/library/herd-missing:1b", insecure=True)
    assert events[-1] == {"error": "pull model manifest: file does not exist"}
    assert emu.post_json("/api/copy", {"source": "nope", "destination": "x"}) == (
        404, {"error": 'model "nope" not found'})
    assert emu.post("/api/delete", {"model": "herd-tiny:1b"}, method="DELETE")[0] == 200
    assert emu.get_json("/api/tags")["models"] == []
    assert list((store / "blobs").iterdir()) == []
    assert emu.post_json("/api/delete", {"model": "herd-tiny:1b"}, method="DELETE") == (
        404, {"error": "model 'herd-tiny:1b' not found"})


def test_pull_rejects_corrupt_blob(start_emulator, start_registry, lab_models, tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(lab_models, root)
    manifest = json.loads((root / "manifests/registry.ollama.ai/library/herd-small/7b").read_text())
    blob = root / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    registry = start_registry(root)
    emu = start_emulator(**fast(str(tmp_path / "store")))
    name = f"localhost:{registry.port}/library/herd-small:7b"
    status, events = _pull(emu, name, insecure=True)
    assert events[-1]["error"].startswith("digest mismatch, file must be downloaded again: want " +
                                          manifest["layers"][0]["digest"])
    assert emu.get_json("/api/tags")["models"] == []
    status, body = emu.post_json("/api/pull", {"model": name, "insecure": True, "stream": False})
    assert status == 500 and body["error"].startswith("digest mismatch")


def test_client_disconnect_frees_slot(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, OLLAMA_NUM_PARALLEL=1, HERD_EMU_TOKENS_PER_SECOND=20))
    emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": ""})
    conn = emu.conn()
    conn.request("POST", "/api/generate", body=json.dumps({"model": "herd-tiny:1b", "prompt": "x",
                                                          "options": {"num_predict": 200}}))
    resp = conn.getresponse()
    assert resp.readline()  # generating: the only slot is taken for ~10 s
    conn.sock.close()
    conn.close()
    started = time.monotonic()
    status, body = emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": "x", "stream": False,
                                                   "options": {"num_predict": 2}})
    assert status == 200 and time.monotonic() - started < 2


def test_cli_version_and_list(start_emulator, lab_models):
    import subprocess
    import sys

    from standins_lab import EMULATOR

    out = subprocess.run([sys.executable, str(EMULATOR), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ollama version is 0.") and out.stdout.strip().endswith("-herd-emulator")
    emu = start_emulator(**fast(lab_models))
    listing = subprocess.run([sys.executable, str(EMULATOR), "list"], capture_output=True, text=True, check=True,
                             env={"OLLAMA_HOST": f"127.0.0.1:{emu.port}", "PATH": "/usr/bin:/bin"})
    assert listing.stdout.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert "herd-small:7b" in listing.stdout


def test_context_length_sizes_the_kv_cache_and_is_reported(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, OLLAMA_NUM_PARALLEL=2, OLLAMA_CONTEXT_LENGTH=4096))
    emu.post_json("/api/generate", {"model": "herd-small:7b", "prompt": ""})
    (model,) = emu.get_json("/api/ps")["models"]
    # 5632 MiB weights + 2 slots x 4096 tokens x 56 MiB/1k = 448 MiB
    assert model["context_length"] == 4096
    assert model["size"] == model["size_vram"] == (5632 + 448) * 1024 * 1024
    log = emu.log()
    assert "OLLAMA_CONTEXT_LENGTH=4096" in log and "OLLAMA_NO_CLOUD=False" in log and "0.34.2-herd-emulator" in log


def test_two_models_stay_resident_with_room_and_max_loaded(start_emulator, lab_models):
    """herd's default layout: OLLAMA_MAX_LOADED_MODELS = models held, both fit: both stay in /api/ps."""
    emu = start_emulator(**fast(lab_models, OLLAMA_MAX_LOADED_MODELS=2, OLLAMA_KEEP_ALIVE="-1",
                                OLLAMA_CONTEXT_LENGTH=8192, OLLAMA_NUM_PARALLEL=2))
    for name in ("herd-tiny:1b", "herd-small:7b", "herd-tiny:1b"):
        assert emu.post_json("/api/generate", {"model": name, "prompt": ""})[0] == 200
    assert sorted(m["name"] for m in emu.get_json("/api/ps")["models"]) == ["herd-small:7b", "herd-tiny:1b"]


def test_vram_evicts_the_least_recently_used_idle_model(start_emulator, lab_models):
    """Room for both by count (OLLAMA_MAX_LOADED_MODELS=3) but not by memory: the idle one is evicted."""
    # One RTX 4090 (24563 MiB free), 10 slots x 32768 tokens (capped at each model's trained context):
    # tiny 1536 + 10 x 8192 x 32/1024 = 4096 MiB, small 5632 + 10 x 32768 x 56/1024 = 23552 MiB; 27648 > 24563.
    emu = start_emulator(**fast(lab_models, HERD_LAB_GPU_SPEC=RTX, CUDA_VISIBLE_DEVICES="0", OLLAMA_NUM_PARALLEL=10,
                                OLLAMA_CONTEXT_LENGTH=32768, OLLAMA_MAX_LOADED_MODELS=3, OLLAMA_KEEP_ALIVE="-1"))
    assert emu.post_json("/api/generate", {"model": "herd-tiny:1b", "prompt": ""})[0] == 200
    assert emu.post_json("/api/generate", {"model": "herd-small:7b", "prompt": ""})[0] == 200
    assert [m["name"] for m in emu.get_json("/api/ps")["models"]] == ["herd-small:7b"]
    assert "model unloaded (simulated)" in emu.log()


def test_startup_prunes_unreferenced_blobs_unless_noprune(start_emulator, lab_models, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(lab_models, models)
    stray = models / "blobs" / ("sha256-" + "ab" * 32)
    stray.write_bytes(b"left over")
    emu = start_emulator(**fast(str(models), OLLAMA_NOPRUNE="1"))
    assert emu.get("/")[0] == 200 and stray.exists()
    emu.stop()
    emu = start_emulator(**fast(str(models)))
    assert emu.get("/")[0] == 200 and not stray.exists()
    assert "total unused blobs removed: 1" in emu.log()
    # every lab model is still whole
    assert sorted(m["name"] for m in emu.get_json("/api/tags")["models"]) == [
        "herd-embed:v1", "herd-large:70b", "herd-small:7b", "herd-small:latest", "herd-tiny:1b"]


def test_extra_ports_are_instances_of_their_own(start_emulator, lab_models):
    """HERD_EMU_EXTRA_PORTS (the scale benchmark's hundreds of instances): each extra port is an instance with its
    own scheduler, slots, loaded models and simulated GPU, served by the same process."""
    import socket
    import urllib.request

    def call(port, path, payload=None):
        data = json.dumps(payload).encode() if payload is not None else None
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data),
                                    timeout=30) as resp:
            return json.loads(resp.read())

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    emu = start_emulator(OLLAMA_MODELS=lab_models, HERD_LAB_GPU_SPEC=str(GPUS / "l20x4.json"), CUDA_VISIBLE_DEVICES="0",
                         HERD_EMU_LOAD_SECONDS="0.01", HERD_EMU_EXTRA_PORTS=",".join(map(str, ports)))
    for port in ports:
        assert call(port, "/api/version") == emu.get_json("/api/version")
    answer = call(ports[0], "/api/generate", {"model": "herd-tiny:1b", "prompt": "hi", "stream": False,
                                              "options": {"num_predict": 2}})
    assert answer["done"] is True
    # Only the instance that was asked loaded the model.
    loaded = [[m["name"] for m in call(port, "/api/ps")["models"]] for port in (emu.port, *ports)]
    assert loaded == [[], ["herd-tiny:1b"], []], loaded
    assert "serving 2 more instances from this process" in emu.log()
    assert emulator.parse_ports("7-9") == [7, 8, 9] and emulator.parse_ports("") == []
    with pytest.raises(ValueError, match="HERD_EMU_EXTRA_PORTS"):
        emulator.parse_ports("0,70000")
