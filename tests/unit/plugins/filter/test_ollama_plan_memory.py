"""Several models per instance (issue 21) and the KV arithmetic (issue 19), on the lab's GPU tables.

The GPU lists come from the lab's nvidia-smi stand-in (lab/gpus/*.json) read by the real nvidia_gpu_info parser:
4x L20 48 GB (46068 MiB), 8x RTX 4090 24 GB (24564 MiB), and the H100 80 GB (81559 MiB) of h100-mig.json with MIG
switched off. docs/planner.md ("Memory") quotes the numbers asserted here.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[4]
SMI = REPO / "lab" / "standins" / "nvidia-smi"


@pytest.fixture(scope="module")
def lab_gpus(gpu_info, tmp_path_factory):
    """The `gpus` list nvidia_gpu_info would return on a lab host with this spec."""

    def read(name, whole=False):
        spec = REPO / "lab" / "gpus" / f"{name}.json"
        if whole:  # the same cards with MIG off
            data = json.loads(spec.read_text())
            for gpu in data["gpus"]:
                gpu["mig_mode"] = "Disabled"
                gpu.pop("mig_devices", None)
            spec = tmp_path_factory.mktemp("gpus") / f"{name}-whole.json"
            spec.write_text(json.dumps(data))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HERD_LAB_GPU_SPEC": str(spec)}
        fields = list(gpu_info.QUERY_FIELDS)
        out = subprocess.run(
            [str(SMI), f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, env=env, timeout=10, check=True,
        ).stdout
        return gpu_info.parse_query_output(out, fields)

    return read


def cfg(**config):
    config.setdefault("host", "gpu1")
    return config


TINY = {"name": "herd-tiny:1b", "vram_gib": 1.5}
SMALL = {"name": "herd-small:7b", "vram_gib": 5.5}


# -- the arithmetic --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "vram", "billions", "kv"),
    [
        ("qwen2.5:7b", None, 7, 128),
        ("llama3.3:70b", None, 70, 320),
        ("qwen2.5:1.5b-instruct-q4_K_M", None, 1.5, 32),
        ("llama3.2:3b", None, 3, 112),
        ("qwen2.5:14b", None, 14, 192),
        ("qwen2.5:32b", None, 32, 256),
        ("mixtral:8x7b", None, 7, 128),
        ("bge-m3", 1.2, 2, 32),  # no size in the name: from vram_gib at 0.6 GiB per billion
        ("bge-m3", None, None, 128),  # nothing known: the 8B figure
        ("team/coder-33b:q4", None, 33, 256),
    ],
)
def test_default_kv_from_parameter_size(planner, name, vram, billions, kv):
    got = planner.parameter_billions(name, vram)
    assert got == pytest.approx(billions) if billions is not None else got is None
    assert planner.default_kv_mib_per_1k(name, vram) == kv


def test_kv_counts_parallel_slots_context_and_cache_type(planner):
    model = {"name": "llama3.3:70b", "vram_gib": 43}
    mem = planner.model_memory_mib(model, 4, 8192, "", True)
    assert mem == {"weights_mib": 43 * 1024, "kv_mib": 4 * 8 * 320, "kv_mib_per_1k_ctx": 320}
    assert planner.model_memory_mib(model, 4, 8192, "q8_0", True)["kv_mib"] == 4 * 8 * 160
    assert planner.model_memory_mib(model, 4, 8192, "q4_0", True)["kv_mib"] == 4 * 8 * 80
    # Ollama keeps an f16 cache without flash attention.
    assert planner.model_memory_mib(model, 4, 8192, "q8_0", False)["kv_mib"] == 4 * 8 * 320
    # The entry's own figure wins over the default.
    assert planner.model_memory_mib(dict(model, kv_mib_per_1k_ctx=100), 2, 4096, "", True)["kv_mib"] == 800


@pytest.mark.parametrize(("vram_mib", "ctx"), [(24564, 4096), (46068, 32768), (49128, 32768), (49152, 262144), (81559, 262144)])
def test_ollama_default_context_by_gpu_memory(planner, vram_mib, ctx):
    # Ollama >= 0.15.5 without OLLAMA_CONTEXT_LENGTH: under 24 GiB 4k, 24-48 GiB 32k, 48 GiB and more 256k.
    assert planner.ollama_default_context(vram_mib) == ctx


# -- L20 48 GB: the lab default, two models per instance --------------------------------------------------------------
def test_l20_two_models_per_instance_all_resident(planner, lab_gpus):
    gpus = lab_gpus("l20x4")
    assert [g["memory_total_mib"] for g in gpus] == [46068] * 4
    config = cfg(models=[TINY, SMALL], num_parallel=2)
    assert planner.ollama_plan_errors(gpus, config) == []
    result = planner.plan_instances(gpus, config)
    for inst in result:
        assert inst["models"] == ["herd-tiny:1b", "herd-small:7b"]
        assert inst["env"]["OLLAMA_MAX_LOADED_MODELS"] == "2"
        assert inst["env"]["OLLAMA_CONTEXT_LENGTH"] == "8192"
        assert inst["env"]["OLLAMA_NOPRUNE"] == "1"
        assert inst["keep_resident"] is True
    need, parts = planner.resident_need_mib([TINY, SMALL], 2, 8192, "", True, 0, 10)
    # tiny 1536 + KV 2 x 8 x 32 = 512; small 5632 + KV 2 x 8 x 128 = 2048; x 1.1
    assert [(p["name"], p["weights_mib"], p["kv_mib"]) for p in parts] == [
        ("herd-small:7b", 5632, 2048), ("herd-tiny:1b", 1536, 512)]
    assert need == pytest.approx(10700.8)


def test_l20_too_many_models_for_one_gpu_is_refused_with_the_fixes(planner, lab_gpus):
    gpus = lab_gpus("l20x4")
    models = [{"name": "qwen2.5:32b", "vram_gib": 20}, {"name": "qwen2.5:14b", "vram_gib": 9}, SMALL]
    found = planner.ollama_plan_errors(gpus, cfg(models=models, gpu_groups=[[0], [1]]))
    assert len(found) == 2  # one per instance
    msg = found[0]
    # 32b 20480 + KV 4 x 8 x 256 = 8192; 14b 9216 + 6144; 7b 5632 + 4096 -> 53760 x 1.1 = 59136 MiB
    assert msg.startswith(
        "ollama_models on gpu1: instance 0 holds 3 models and may keep 3 loaded at once "
        "(qwen2.5:32b, qwen2.5:14b, herd-small:7b): they need about 57.8 GiB together"
    )
    assert "but instance 0 has 45.0 GiB (GPU 0: NVIDIA L20)" in msg
    for fix in ("hold fewer models per instance", "ollama_gpu_groups", "`instances:`",
                "ollama_max_loaded_models below the model count with a finite ollama_keep_alive"):
        assert fix in msg
    # Automatic groups (no explicit ones) size each instance for all three together: two L20s each.
    assert [i["gpus"] for i in planner.plan_instances(gpus, cfg(models=models))] == [[0, 1], [2, 3]]


# -- RTX 4090 24 GB: chat + embedding model, and taking turns ---------------------------------------------------------
def test_rtx4090_chat_and_embedding_fit(planner, lab_gpus):
    gpus = lab_gpus("rtx4090x8")
    assert len(gpus) == 8 and gpus[0]["memory_total_mib"] == 24564
    models = [{"name": "qwen2.5:7b", "vram_gib": 6}, {"name": "bge-m3", "vram_gib": 1.2}]
    result = planner.plan_instances(gpus, cfg(models=models))
    assert len(result) == 8
    assert result[0]["models"] == ["qwen2.5:7b", "bge-m3:latest"]
    assert result[0]["env"]["OLLAMA_MAX_LOADED_MODELS"] == "2"
    need, _ = planner.resident_need_mib(
        [dict(m, instances=None) for m in models], 4, 8192, "", True, 0, 10)
    # qwen 6144 + KV 4 x 8 x 128 = 4096; bge-m3 1228.8 + KV 4 x 8 x 32 = 1024 -> 12492.8 x 1.1
    assert need == pytest.approx(13742.08)


def test_rtx4090_models_that_do_not_fit_together_may_take_turns(planner, lab_gpus):
    gpus = lab_gpus("rtx4090x8")
    models = [{"name": "qwen2.5:14b", "vram_gib": 9}, {"name": "qwen2.5:7b", "vram_gib": 6}]
    groups = [[i] for i in range(8)]
    # 14b 9216 + 6144 and 7b 6144 + 4096 = 25600 x 1.1 = 28160 MiB > 24564
    found = planner.ollama_plan_errors(gpus, cfg(models=models, gpu_groups=groups))
    assert len(found) == 8 and "they need about 27.5 GiB together" in found[0]
    # The operator lets them take turns: one loaded at a time, finite keep_alive.
    turns = cfg(models=models, gpu_groups=groups, max_loaded_models=1, keep_alive="5m")
    assert planner.ollama_plan_errors(gpus, turns) == []
    inst = planner.plan_instances(gpus, turns)[0]
    assert inst["env"]["OLLAMA_MAX_LOADED_MODELS"] == "1" and inst["keep_resident"] is False
    # ...which contradicts keep_alive -1 (keep every model loaded forever).
    msg = planner.ollama_plan_errors(gpus, cfg(models=models, gpu_groups=[[0]], max_loaded_models=1))[0]
    assert msg.startswith(
        "ollama_max_loaded_models on gpu1: 1 loaded model(s) at a time, but instance 0 holds 2 "
        "(qwen2.5:14b, qwen2.5:7b) and ollama_keep_alive is '-1'"
    )
    assert 'Fix: let them take turns with a finite ollama_keep_alive (e.g. "5m")' in msg
    assert "set ollama_max_loaded_models to 2" in msg


# -- H100 80 GB: Ollama's own context default would reserve 256k tokens per slot ------------------------------------
def test_h100_context_length_default_and_ollama_default(planner, lab_gpus):
    gpus = lab_gpus("h100-mig", whole=True)
    assert [g["memory_total_mib"] for g in gpus] == [81559, 81559]
    llama = {"name": "llama3.3:70b", "vram_gib": 43}
    # herd's default: 4 x 8192 tokens -> (44032 + 10240) x 1.1 = 59699 MiB, fits 81559.
    result = planner.plan_instances(gpus, cfg(models=[llama]))
    assert result[0]["env"]["OLLAMA_CONTEXT_LENGTH"] == "8192" and result[0]["context_length"] == 8192
    # ollama_context_length 0 leaves Ollama's default: 256k on 80 GB, KV 4 x 256 x 320 MiB = 320 GiB.
    found = planner.ollama_plan_errors(gpus, cfg(models=[llama], context_length=0, gpu_groups=[[0], [1]]))
    assert len(found) == 2
    assert found[0].startswith(
        "ollama_models on gpu1: llama3.3:70b needs about 399.3 GiB (43 GiB + KV 4 x 262144 tokens 320.0 GiB")
    assert "OLLAMA_CONTEXT_LENGTH" not in planner.plan_instances(gpus, cfg(context_length=0))[0]["env"]
    # Two 70B models do not fit one H100 together: (44032 + 10240 + 45056 + 10240) x 1.1 = 120525 MiB.
    two = [llama, {"name": "qwen2.5:72b", "vram_gib": 44}]
    msg = planner.ollama_plan_errors(gpus, cfg(models=two, gpu_groups=[[0], [1]]))[0]
    assert "instance 0 holds 2 models" in msg and "but instance 0 has 79.6 GiB (GPU 0: NVIDIA H100 80GB HBM3)" in msg
    # A q8_0 cache with flash attention halves the KV: (44032 + 45056 + 2 x 5120) x 1.1 = 109212 -> still too big.
    assert planner.ollama_plan_errors(gpus, cfg(models=two, gpu_groups=[[0], [1]], kv_cache_type="q8_0"))
    # Taking turns on one H100 each works.
    assert planner.ollama_plan_errors(
        gpus, cfg(models=two, gpu_groups=[[0], [1]], max_loaded_models=1, keep_alive="10m")) == []


# -- names and environment ---------------------------------------------------------------------------------------------
def test_names_are_normalised_once(planner, lab_gpus):
    gpus = lab_gpus("l20x4")
    result = planner.plan_instances(gpus, cfg(models=["tiny", "registry.ollama.ai/library/herd-small:7b", "team/x"]))
    assert result[0]["models"] == ["tiny:latest", "herd-small:7b", "team/x:latest"]
    found = planner.ollama_plan_errors(gpus, cfg(models=["tiny", "library/tiny:latest"]))
    assert found == [
        "ollama_models[1] on gpu1: tiny:latest is listed twice (written 'library/tiny:latest' here). "
        "Fix: list each model once"
    ]
    assert planner.ollama_plan_errors(gpus, cfg(models=["bad name"]))[0].startswith(
        "ollama_models[0] on gpu1: 'bad name' is not a model name")


def test_no_cloud_noprune_and_explicit_max_loaded(planner, lab_gpus):
    gpus = lab_gpus("l20x4")
    result = planner.plan_instances(gpus, cfg(models=[TINY], no_cloud=True, max_loaded_models=3))
    assert result[0]["env"]["OLLAMA_NO_CLOUD"] == "1"
    assert result[0]["env"]["OLLAMA_MAX_LOADED_MODELS"] == "3"
    assert "OLLAMA_NO_CLOUD" not in planner.plan_instances(gpus, cfg(models=[TINY]))[0]["env"]
    msg = planner.ollama_plan_errors(gpus, cfg(extra_env={"OLLAMA_NOPRUNE": "0"}))[0]
    assert msg.startswith("ollama_extra_env.OLLAMA_NOPRUNE on gpu1: OLLAMA_NOPRUNE is set by herd itself")
    assert planner.ollama_plan_errors(gpus, cfg(models=[dict(TINY, kv_mib_per_1k_ctx=0)]))[0].startswith(
        "ollama_models[0].kv_mib_per_1k_ctx on gpu1: 0.0 is not a positive size")


def test_cpu_instances_have_no_context_from_gpu_memory(planner):
    result = planner.plan_instances([], cfg(cpu_instances=1, context_length=0, models=[TINY]))
    assert result[0]["context_length"] == 0 and result[0]["keep_resident"] is True
