"""Instance planner: the layouts from issue 4 and every validation error, on GPU lists parsed from captured output."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleFilterError

GIB = 1024


def plan(planner, gpus, **config):
    config.setdefault("host", "gpu1")
    return planner.plan_instances(gpus, config)


def errors(planner, gpus, **config):
    config.setdefault("host", "gpu1")
    return planner.ollama_plan_errors(gpus, config)


def warnings(planner, gpus, **config):
    config.setdefault("host", "gpu1")
    return planner.ollama_plan_warnings(gpus, config)


def one_error(planner, gpus, **config):
    found = errors(planner, gpus, **config)
    assert len(found) == 1, found
    return found[0]


# -- layouts -------------------------------------------------------------------------------------------------------
def test_l20_one_instance_per_gpu(planner, gpus_from):
    gpus = gpus_from("l20x5.csv")
    result = plan(planner, gpus, models=["qwen2.5:7b"], flash_attention=True, load_timeout="5m")
    assert [i["id"] for i in result] == [0, 1, 2, 3, 4]
    assert [i["port"] for i in result] == [11434, 11435, 11436, 11437, 11438]
    for inst, gpu in zip(result, gpus, strict=True):
        assert inst["name"] == f"ollama@{inst['id']}" and inst["unit"] == f"ollama@{inst['id']}.service"
        assert inst["mode"] == "systemd" and inst["container"] is None
        assert inst["gpus"] == [gpu["index"]]
        assert inst["gpu_uuids"] == [gpu["uuid"]]
        assert inst["gpu_names"] == ["NVIDIA L20"]
        assert inst["vram_mib"] == 46068
        assert inst["models"] == ["qwen2.5:7b"]
        assert inst["models_dir"] == f"/var/lib/herd/instances/{inst['id']}/models"
        assert inst["env"] == {
            "CUDA_VISIBLE_DEVICES": gpu["uuid"],
            "OLLAMA_HOST": f"127.0.0.1:{inst['port']}",
            "OLLAMA_MODELS": inst["models_dir"],
            "OLLAMA_NUM_PARALLEL": "4",
            "OLLAMA_MAX_QUEUE": "128",
            "OLLAMA_KEEP_ALIVE": "-1",
            "OLLAMA_MAX_LOADED_MODELS": "1",
            "OLLAMA_NOPRUNE": "1",
            "OLLAMA_FLASH_ATTENTION": "1",
            "OLLAMA_LOAD_TIMEOUT": "5m",
            "OLLAMA_CONTEXT_LENGTH": "8192",
        }
        assert (inst["max_loaded_models"], inst["context_length"], inst["keep_resident"]) == (1, 8192, True)
    assert warnings(planner, gpus) == []


def test_seed_second_layout_base_port(planner, gpus_from):
    result = plan(planner, gpus_from("l20x5.csv"), base_port=11534)
    assert [i["port"] for i in result] == [11534, 11535, 11536, 11537, 11538]
    assert result[4]["env"]["OLLAMA_HOST"] == "127.0.0.1:11538"


def test_rtx4090_70b_needs_two_gpus(planner, gpus_from):
    gpus = gpus_from("rtx4090x8.csv")
    result = plan(planner, gpus, models=[{"name": "llama3.3:70b", "vram_gib": 40}], num_parallel=1)
    # (40 GiB + KV 1 x 8192 tokens x 320 MiB/1k = 2.5 GiB) * 1.10 = 46.75 GiB over 24564 MiB cards -> 2 GPUs each.
    assert [i["gpus"] for i in result] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [i["port"] for i in result] == [11434, 11435, 11436, 11437]
    assert result[1]["env"]["CUDA_VISIBLE_DEVICES"] == f"{gpus[2]['uuid']},{gpus[3]['uuid']}"
    assert result[1]["vram_mib"] == 2 * 24564
    assert all(i["models"] == ["llama3.3:70b"] for i in result)


def test_headroom_changes_group_size(planner, gpus_from):
    gpus = gpus_from("rtx4090x8.csv")
    # 44 GiB + KV (1 x 2048 tokens x 320 MiB/1k = 0.6 GiB) with 10% headroom is 49.1 GiB: more than two 24 GiB
    # cards, so 3 per group and 2 GPUs idle; without headroom 44.6 GiB fits two.
    small = {"num_parallel": 1, "context_length": 2048}
    result = plan(planner, gpus, models=[{"name": "big", "vram_gib": 44}], **small)
    assert [i["gpus"] for i in result] == [[0, 1, 2], [3, 4, 5]]
    assert any("GPU(s) 6-7" in w for w in warnings(planner, gpus, models=[{"name": "big", "vram_gib": 44}], **small))
    result = plan(planner, gpus, models=[{"name": "big", "vram_gib": 44}], vram_headroom_pct=0, **small)
    assert [i["gpus"] for i in result] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_explicit_gpus_per_instance(planner, gpus_from):
    gpus = gpus_from("l20x5.csv")
    result = plan(planner, gpus, gpus_per_instance=2)
    assert [i["gpus"] for i in result] == [[0, 1], [2, 3]]
    assert warnings(planner, gpus, gpus_per_instance=2) == [
        "ollama_gpus_per_instance on gpu1: 2 GPUs per instance leaves GPU(s) 4 idle. "
        "Set ollama_gpu_groups to use them in a smaller group."
    ]


def test_seed_groups_0_1_and_2_6(planner, gpus_from):
    gpus = gpus_from("a800x7.csv")
    result = plan(
        planner, gpus, gpu_groups=[[0, 1], [2, 3, 4, 5, 6]], models=[{"name": "deepseek-r1:70b", "vram_gib": 43}]
    )
    assert [i["gpus"] for i in result] == [[0, 1], [2, 3, 4, 5, 6]]
    assert [i["vram_mib"] for i in result] == [2 * 81920, 5 * 81920]
    assert result[1]["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(g["uuid"] for g in gpus[2:7])
    assert [i["port"] for i in result] == [11434, 11435]
    assert warnings(planner, gpus, gpu_groups=[[0, 1], [2, 3, 4, 5, 6]]) == []


def test_mig_host_one_instance_per_mig_device(planner, gpus_from):
    gpus = gpus_from("h100_mig.csv", "h100_mig_L.txt")
    result = plan(planner, gpus, models=["qwen2.5:7b"])
    assert [i["gpus"] for i in result] == [[0], [0], [0], [0], [1]]
    mig = gpus[0]["mig_devices"]
    assert [i["gpu_uuids"] for i in result[:4]] == [[d["uuid"]] for d in mig]
    assert result[0]["env"]["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
    assert result[0]["gpu_names"] == ["NVIDIA H100 80GB HBM3 MIG 3g.40gb"]
    assert [i["vram_mib"] for i in result] == [40960, 20480, 10240, 10240, 81559]
    assert result[4]["env"]["CUDA_VISIBLE_DEVICES"] == gpus[1]["uuid"]


def test_mig_model_too_big_for_slice(planner, gpus_from):
    gpus = gpus_from("h100_mig.csv", "h100_mig_L.txt")
    found = errors(planner, gpus, models=[{"name": "qwen2.5:32b", "vram_gib": 20}], num_parallel=1, context_length=4096)
    # (20 GiB + KV 1 x 4096 x 256 MiB/1k = 1 GiB) + 10% = 23.1 GiB fits the 3g.40gb slice and the whole GPU, not
    # 2g.20gb or the 1g.10gb slices.
    assert len(found) == 3
    assert all(m.startswith("ollama_models on gpu1: qwen2.5:32b needs about 23.1 GiB") for m in found)
    assert "instance 1 has 20.0 GiB (GPU 0: NVIDIA H100 80GB HBM3 MIG 2g.20gb)" in found[0]


def test_mig_group_of_its_own_expands(planner, gpus_from):
    gpus = gpus_from("h100_mig.csv", "h100_mig_L.txt")
    result = plan(planner, gpus, gpu_groups=[[0]])
    assert len(result) == 4 and all(i["gpu_uuids"][0].startswith("MIG-") for i in result)


def test_mig_gpu_cannot_share_a_group(planner, gpus_from):
    gpus = gpus_from("h100_mig.csv", "h100_mig_L.txt")
    msg = one_error(planner, gpus, gpu_groups=[[0, 1]])
    assert msg.startswith("ollama_gpu_groups[0] on gpu1: GPU 0 has MIG enabled and cannot share an instance")
    assert "Fix: give GPU 0 a group of its own ([0])" in msg


def test_mig_without_use_mig(planner, gpus_from):
    gpus = gpus_from("h100_mig.csv", "h100_mig_L.txt")
    msg = one_error(planner, gpus, use_mig=False)
    assert msg.startswith("ollama_use_mig on gpu1: GPU 0 has MIG enabled but ollama_use_mig is false")
    assert "nvidia-smi -i 0 -mig 0" in msg


def test_mig_enabled_without_devices(planner, gpus_from):
    gpus = gpus_from("h100_mig.csv")  # no `nvidia-smi -L` devices attached
    result = plan(planner, gpus)
    assert [i["gpus"] for i in result] == [[1]]
    assert any("GPU 0 has MIG enabled but no MIG devices and stays idle" in w for w in warnings(planner, gpus))
    msg = one_error(planner, gpus, gpu_groups=[[0], [1]])
    assert msg.startswith("ollama_gpu_groups[0] on gpu1: GPU 0 has MIG enabled but no MIG devices")


def test_no_gpu_host_cpu_only(planner):
    result = plan(planner, [], cpu_instances=2, models=["qwen2.5:0.5b"], flash_attention=False)
    assert [i["id"] for i in result] == [0, 1]
    for inst in result:
        assert inst["gpus"] == [] and inst["gpu_uuids"] == [] and inst["gpu_names"] == []
        assert inst["vram_mib"] == 0
        assert inst["env"]["CUDA_VISIBLE_DEVICES"] == "-1"
        assert inst["env"]["OLLAMA_FLASH_ATTENTION"] == "0"
        assert "OLLAMA_LLM_LIBRARY" not in inst["env"]
        assert inst["models"] == ["qwen2.5:0.5b"]


def test_cpu_mode_on_gpu_host_warns(planner, gpus_from):
    gpus = gpus_from("l20x5.csv")
    assert len(plan(planner, gpus, cpu_instances=1)) == 1
    assert (
        "ollama_cpu_instances on gpu1: this host has 5 GPU(s) but runs CPU-only instances"
        in warnings(planner, gpus, cpu_instances=1)[0]
    )


def test_mixed_cards(planner, gpus_from):
    gpus = gpus_from("a100_mixed.csv")
    result = plan(planner, gpus)
    assert [i["vram_mib"] for i in result] == [81920, 40960, 23028]
    assert [i["gpu_names"] for i in result] == [["NVIDIA A100 80GB PCIe"], ["NVIDIA A100-PCIE-40GB"], ["NVIDIA A10"]]
    # Automatic sizing follows the smallest card: (30 GiB + KV 1 x 2048 x 320 MiB/1k) * 1.1 = 33.7 GiB needs 2 x 22.5.
    small = {"num_parallel": 1, "context_length": 2048}
    assert [i["gpus"] for i in plan(planner, gpus, models=[{"name": "m", "vram_gib": 30}], **small)] == [[0, 1]]
    # Explicit groups place the model where it fits; the mixed group is flagged.
    result = plan(
        planner,
        gpus,
        gpu_groups=[[0], [1, 2]],
        models=[{"name": "m", "vram_gib": 30, "instances": [1]}, {"name": "s", "vram_gib": 8}],
        **small,
    )
    assert [i["vram_mib"] for i in result] == [81920, 40960 + 23028]
    assert any("instance 1" in w and "mixes GPU models" in w for w in warnings(planner, gpus, gpu_groups=[[0], [1, 2]]))
    msg = one_error(planner, gpus, gpu_groups=[[0], [1], [2]], models=[{"name": "m", "vram_gib": 30}], **small)
    assert msg.startswith(
        "ollama_models on gpu1: m:latest needs about 33.7 GiB (30 GiB + KV 1 x 2048 tokens 0.6 GiB + 10% headroom) "
        "but instance 2 has 22.5 GiB"
    )


def test_model_restricted_to_instances_and_overrides(planner, gpus_from):
    gpus = gpus_from("l20x5.csv")
    result = plan(
        planner,
        gpus,
        models=["qwen2.5:7b", {"name": "llama3.1:8b", "instances": [0, 2]}],
        instance_overrides={1: {"num_parallel": 8, "max_queue": 16, "keep_alive": "30m"}, "4": {"models": ["bge-m3"]}},
        num_parallel=2,
        extra_env={"OLLAMA_DEBUG": "1", "OLLAMA_SCHED_SPREAD": True},
        context_length=8192,
        kv_cache_type="q8_0",
        flash_attention=True,
    )
    assert [i["models"] for i in result] == [
        ["qwen2.5:7b", "llama3.1:8b"],
        ["qwen2.5:7b"],
        ["qwen2.5:7b", "llama3.1:8b"],
        ["qwen2.5:7b"],
        ["bge-m3:latest"],
    ]
    # OLLAMA_MAX_LOADED_MODELS follows the models each instance holds.
    assert [i["env"]["OLLAMA_MAX_LOADED_MODELS"] for i in result] == ["2", "1", "2", "1", "1"]
    # A finite keep_alive (instance 1) means "loads and answers", not "stays resident".
    assert [i["keep_resident"] for i in result] == [True, False, True, True, True]
    assert (result[1]["num_parallel"], result[1]["max_queue"]) == (8, 16)
    assert result[1]["env"]["OLLAMA_NUM_PARALLEL"] == "8" and result[1]["env"]["OLLAMA_KEEP_ALIVE"] == "30m"
    assert result[0]["num_parallel"] == 2 and result[0]["env"]["OLLAMA_NUM_PARALLEL"] == "2"
    env = result[0]["env"]
    assert env["OLLAMA_DEBUG"] == "1" and env["OLLAMA_SCHED_SPREAD"] == "true"
    assert env["OLLAMA_CONTEXT_LENGTH"] == "8192" and env["OLLAMA_KV_CACHE_TYPE"] == "q8_0"


def test_bind_address_ipv6_and_data_dir(planner, gpus_from):
    result = plan(planner, gpus_from("l20x5.csv"), bind_address="::", data_dir="/srv/herd/")
    assert result[0]["env"]["OLLAMA_HOST"] == "[::]:11434"
    assert result[2]["models_dir"] == "/srv/herd/instances/2/models"


# OLLAMA_MULTIUSER_CACHE exists from Ollama 0.3.13 up to, not including, 0.30.0 (llama-server's prompt cache since).
@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("0.20.1", "1"),
        ("0.3.13", "1"),
        ("0.29.9", "1"),
        ("v0.20.1", "1"),
        ("0.20.1-rc1", "1"),
        ("0.3.12", None),
        ("0.30.0", None),
        ("0.30.0-rc1", None),
        ("0.34.2", None),
        ("1.0.0", None),
        ("latest", None),  # not a version the planner reads: a current release, nothing set
        ("", None),
    ],
)
def test_multiuser_cache_only_where_ollama_reads_it(planner, gpus_from, version, expected):
    result = plan(planner, gpus_from("l20x5.csv"), version=version)
    assert all(i["env"].get("OLLAMA_MULTIUSER_CACHE") == expected for i in result)
    assert errors(planner, gpus_from("l20x5.csv"), version=version) == []


def test_multiuser_cache_default_and_off(planner, gpus_from):
    gpus = gpus_from("l20x5.csv")
    assert planner.DEFAULTS["multiuser_cache"] is True and planner.DEFAULTS["version"] == "0.34.2"
    assert "OLLAMA_MULTIUSER_CACHE" not in plan(planner, gpus)[0]["env"]
    assert "OLLAMA_MULTIUSER_CACHE" not in plan(planner, gpus, version="0.20.1", multiuser_cache=False)[0]["env"]
    assert "OLLAMA_MULTIUSER_CACHE" not in plan(planner, gpus, version="0.20.1", multiuser_cache="no")[0]["env"]
    assert plan(planner, gpus, version="0.20.1", multiuser_cache="true")[0]["env"]["OLLAMA_MULTIUSER_CACHE"] == "1"


def test_multiuser_cache_in_extra_env_names_the_knob(planner, gpus_from):
    msg = one_error(planner, gpus_from("l20x5.csv"), version="0.20.1", extra_env={"OLLAMA_MULTIUSER_CACHE": "1"})
    assert msg.startswith("ollama_extra_env.OLLAMA_MULTIUSER_CACHE on gpu1: OLLAMA_MULTIUSER_CACHE is set by herd")
    assert msg.endswith("Fix: remove it from ollama_extra_env and set ollama_multiuser_cache instead")


def test_kv_cache_without_flash_attention_warns(planner, gpus_from):
    found = warnings(planner, gpus_from("l20x5.csv"), kv_cache_type="q4_0", flash_attention=False)
    assert found == [
        "ollama_kv_cache_type on gpu1: q4_0 needs flash attention, which is not on. "
        "Set ollama_flash_attention: true, or Ollama keeps an f16 cache."
    ]


def test_accepts_module_result_and_string_numbers(planner, gpus_from):
    gpus = gpus_from("l20x5.csv")
    result = planner.plan_instances({"gpus": gpus}, {"host": "gpu1", "base_port": "12000", "num_parallel": "3"})
    assert result[0]["port"] == 12000 and result[0]["env"]["OLLAMA_NUM_PARALLEL"] == "3"


def test_filter_registration_and_raise(planner, gpus_from):
    filters = planner.FilterModule().filters()
    assert set(filters) == {"ollama_plan", "ollama_model_name", "ollama_not_ready", "ollama_pull_name",
                            "ollama_registry_error", "ollama_path_errors", "ollama_embedding_only",
                            "ollama_rolling_batches", "ollama_rolling_floor_errors"}
    assert filters["ollama_model_name"]("library/tiny") == "tiny:latest"
    with pytest.raises(AnsibleFilterError):
        filters["ollama_model_name"]("bad name")
    assert filters["ollama_pull_name"]("tiny", "mirror:5000") == "mirror:5000/library/tiny:latest"
    assert filters["ollama_pull_name"]("tiny") == "registry.ollama.ai/library/tiny:latest"
    with pytest.raises(AnsibleFilterError, match="ollama_registry must be a registry host"):
        filters["ollama_pull_name"]("tiny", "http://mirror:5000")
    assert "bad port" in filters["ollama_registry_error"]("mirror:0")
    result = filters["ollama_plan"](gpus_from("l20x5.csv"), {"host": "gpu1", "gpu_groups": [[9]], "num_parallel": 0})
    assert result["instances"] == [] and len(result["errors"]) == 2 and result["warnings"] == []
    valid = filters["ollama_plan"](gpus_from("l20x5.csv"), {"host": "gpu1"})
    assert len(valid["instances"]) == 5 and valid["errors"] == []
    with pytest.raises(AnsibleFilterError) as err:
        planner.plan_instances(gpus_from("l20x5.csv"), {"host": "gpu1", "gpu_groups": [[9]], "num_parallel": 0})
    text = str(err.value)
    assert text.startswith("ollama instance plan for gpu1 is not valid:")
    assert "GPU 9 is not on this host" in text and "ollama_num_parallel on gpu1: 0 is out of range" in text


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("-1", -1), ("0", 0), (300, 300), ("1.5h", 5400), ("-1m", -60), ("90s", 90)],
)
def test_parse_duration(planner, value, seconds):
    assert planner.parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["-5x", "abc", "", "5 m", "m5", True, None, [1]])
def test_parse_duration_rejects(planner, value):
    with pytest.raises(ValueError):
        planner.parse_duration(value)


# -- every validation error names the variable, the host, the value and the fix --------------------------------------
def test_error_gpu_index_absent(planner, gpus_from):
    msg = one_error(planner, gpus_from("rtx4090x8.csv"), gpu_groups=[[0, 1], [9]])
    assert msg == (
        "ollama_gpu_groups[1] on gpu1: GPU 9 is not on this host (it has GPUs 0-7). Fix: use indices from "
        "`nvidia-smi -L`, or leave ollama_gpu_groups empty for one instance per GPU"
    )


def test_error_gpu_in_two_groups(planner, gpus_from):
    msg = one_error(planner, gpus_from("rtx4090x8.csv"), gpu_groups=[[0, 1], [1, 2]])
    assert msg == (
        "ollama_gpu_groups[1] on gpu1: GPU 1 is also in ollama_gpu_groups[0]. Fix: put every GPU in at most one group"
    )
    assert "twice in this group" in one_error(planner, gpus_from("rtx4090x8.csv"), gpu_groups=[[0, 0]])


def test_error_port_clash_with_gateway(planner, gpus_from):
    msg = one_error(
        planner,
        gpus_from("l20x5.csv"),
        base_port=441,
        reserved_ports=[{"port": 443, "owner": "the gateway on this host (gateway_https_port)"}],
    )
    assert msg == (
        "ollama_base_port on gpu1: instance 2 would listen on port 443, which the gateway on this host "
        "(gateway_https_port) already uses. Fix: move ollama_base_port so that ports 441-445 avoid 443 (e.g. 11434)"
    )
    assert "a port reserved on this host" in one_error(planner, gpus_from("l20x5.csv"), reserved_ports=[11436])


def test_error_port_out_of_range(planner, gpus_from):
    msg = one_error(planner, gpus_from("l20x5.csv"), base_port=65533)
    assert msg == (
        "ollama_base_port on gpu1: 5 instances from port 65533 would need ports up to 65537, beyond 65535. "
        "Fix: set ollama_base_port to at most 65531"
    )
    assert one_error(planner, gpus_from("l20x5.csv"), base_port=0).startswith(
        "ollama_base_port on gpu1: 0 is out of range (1-65535)"
    )


def test_error_model_cannot_fit_group(planner, gpus_from):
    gpus = gpus_from("rtx4090x8.csv")
    # 43 GiB + KV (1 x 1024 tokens x 320 MiB/1k = 0.3 GiB) + 10% = 47.6 GiB fits two 4090s (48.0 GiB)...
    small = {"num_parallel": 1, "context_length": 1024}
    llama = {"name": "llama3.3:70b", "vram_gib": 43}
    assert errors(planner, gpus, gpu_groups=[[0, 1]], models=[llama], **small) == []
    # ...but not with the default 4 parallel slots of 8192 tokens: KV 10 GiB.
    msg = one_error(planner, gpus, gpu_groups=[[0, 1]], models=[llama])
    assert msg == (
        "ollama_models on gpu1: llama3.3:70b needs about 58.3 GiB (43 GiB + KV 4 x 8192 tokens 10.0 GiB + 10% "
        "headroom) but instance 0 has 48.0 GiB (GPU 0: NVIDIA GeForce RTX 4090, 1: NVIDIA GeForce RTX 4090). "
        "Fix: give it a bigger group (ollama_gpu_groups, or ollama_gpus_per_instance 0 to size groups from vram_gib), "
        "restrict the model to bigger instances with `instances:`, lower ollama_num_parallel or "
        "ollama_context_length, or lower ollama_vram_headroom_pct"
    )


def test_error_model_bigger_than_host(planner, gpus_from):
    msg = one_error(planner, gpus_from("l20x5.csv"), models=[{"name": "deepseek-v3:671b", "vram_gib": 404}])
    # (404 GiB + KV 4 x 8192 x 320 MiB/1k = 10 GiB) x 1.1
    assert msg.startswith("ollama_models on gpu1: deepseek-v3:671b need(s) about 455.4 GiB with KV cache (4 x 8192")
    assert "this host has 5 GPU(s)" in msg


def test_error_override_model_cannot_fit(planner, gpus_from):
    msg = one_error(
        planner, gpus_from("l20x5.csv"), instance_overrides={3: {"models": [{"name": "big:1", "vram_gib": 60}]}}
    )
    assert msg.startswith("ollama_instance_overrides[3].models on gpu1: big:1 needs about 77.0 GiB (60 GiB + KV")


def test_error_zero_instances(planner):
    msg = one_error(planner, [])
    assert msg.startswith("ollama_cpu_instances on gpu1: the plan has zero instances (no GPU found on this host)")
    assert "set ollama_cpu_instances" in msg


def test_error_gpus_per_instance_too_large(planner, gpus_from):
    msg = one_error(planner, gpus_from("l20x5.csv"), gpus_per_instance=6)
    assert msg == (
        "ollama_gpus_per_instance on gpu1: 6 GPUs per instance but this host has 5 GPU(s) without MIG. "
        "Fix: use at most 5, or 0 to size groups from the models' vram_gib"
    )


@pytest.mark.parametrize(
    ("key", "value", "start"),
    [
        ("keep_alive", "-5x", "ollama_keep_alive on gpu1: '-5x' is not a duration. Fix: use a duration such as"),
        ("keep_alive", "abc", "ollama_keep_alive on gpu1: 'abc' is not a duration"),
        ("load_timeout", "0", "ollama_load_timeout on gpu1: '0' is not a positive duration. Fix:"),
        ("load_timeout", "-3m", "ollama_load_timeout on gpu1: '-3m' is not a positive duration"),
        ("load_timeout", "soon", "ollama_load_timeout on gpu1: 'soon' is not a duration"),
    ],
)
def test_error_invalid_durations(planner, gpus_from, key, value, start):
    assert one_error(planner, gpus_from("l20x5.csv"), **{key: value}).startswith(start)


def test_negative_keep_alive_means_forever(planner, gpus_from):
    assert errors(planner, gpus_from("l20x5.csv"), keep_alive="-10m") == []
    assert errors(planner, gpus_from("l20x5.csv"), keep_alive=-1) == []


def test_error_override_duration(planner, gpus_from):
    msg = one_error(planner, gpus_from("l20x5.csv"), instance_overrides={0: {"keep_alive": "forever"}})
    assert msg.startswith("ollama_instance_overrides[0].keep_alive on gpu1: 'forever' is not a duration")


def test_error_unknown_top_level_key(planner, gpus_from):
    msg = one_error(planner, gpus_from("l20x5.csv"), num_paralel=8)
    assert msg == "ollama_num_paralel on gpu1: is not a setting of the planner. Fix: rename it to ollama_num_parallel"
    msg = one_error(planner, gpus_from("l20x5.csv"), colour="blue")
    assert msg.startswith("ollama_colour on gpu1: is not a setting of the planner. Fix: remove it")


def test_error_unknown_override_key(planner, gpus_from):
    msg = one_error(planner, gpus_from("l20x5.csv"), instance_overrides={1: {"port": 12000}})
    assert msg == (
        "ollama_instance_overrides[1].port on gpu1: is not a per-instance setting. "
        "Fix: use only num_parallel, models, max_queue, keep_alive"
    )


def test_error_override_for_missing_instance(planner, gpus_from):
    msg = one_error(planner, gpus_from("l20x5.csv"), instance_overrides={7: {"num_parallel": 2}})
    assert msg.startswith(
        "ollama_instance_overrides[7] on gpu1: instance 7 does not exist (this host has instances 0-4)"
    )


def test_error_unknown_model_key_and_instances(planner, gpus_from):
    gpus = gpus_from("l20x5.csv")
    msg = one_error(planner, gpus, models=[{"name": "a", "vram": 4}])
    assert msg == (
        "ollama_models[0] on gpu1: unknown key(s) vram. Fix: use only name, vram_gib, kv_mib_per_1k_ctx, instances"
    )
    msg = one_error(planner, gpus, models=[{"name": "a", "instances": [0, 8]}])
    assert msg.startswith("ollama_models (a:latest).instances on gpu1: instance(s) 8 do not exist")
    assert "listed twice" in one_error(planner, gpus, models=["a", "a"])
    assert one_error(planner, gpus, models=[{"name": "a", "vram_gib": -2}]).startswith(
        "ollama_models[0].vram_gib on gpu1: -2.0 is not a positive size"
    )
    assert "is not a model name" in one_error(planner, gpus, models=["has space"])


@pytest.mark.parametrize(
    ("config", "start"),
    [
        ({"num_parallel": 0}, "ollama_num_parallel on gpu1: 0 is out of range (at least 1)"),
        ({"max_queue": "many"}, "ollama_max_queue on gpu1: 'many' is not a whole number"),
        ({"max_loaded_models": True}, "ollama_max_loaded_models on gpu1: True is a boolean"),
        ({"vram_headroom_pct": 150}, "ollama_vram_headroom_pct on gpu1: 150 is out of range (0-100)"),
        ({"context_length": -1}, "ollama_context_length on gpu1: -1 is out of range"),
        ({"kv_cache_type": "q2"}, "ollama_kv_cache_type on gpu1: 'q2' is not a KV cache type"),
        ({"bind_address": "not an address"}, "ollama_bind_address on gpu1: 'not an address' is not an IP address"),
        ({"data_dir": "relative/dir"}, "ollama_data_dir on gpu1: 'relative/dir' is not an absolute path"),
        ({"use_mig": "maybe"}, "ollama_use_mig on gpu1: 'maybe' is not true or false"),
        ({"flash_attention": "sometimes"}, "ollama_flash_attention on gpu1: 'sometimes' is not true or false"),
        ({"multiuser_cache": "maybe"}, "ollama_multiuser_cache on gpu1: 'maybe' is not true or false"),
        ({"multiuser_cache": 2}, "ollama_multiuser_cache on gpu1: 2 is not true or false"),
        ({"extra_env": {"1BAD": "x"}}, "ollama_extra_env on gpu1: '1BAD' is not an environment variable name"),
        ({"extra_env": {"OLLAMA_HOST": "0.0.0.0"}}, "ollama_extra_env.OLLAMA_HOST on gpu1: OLLAMA_HOST is set by herd"),
        ({"extra_env": {"X": [1]}}, "ollama_extra_env.X on gpu1: [1] is not a string"),
        ({"gpu_groups": [[0], []]}, "ollama_gpu_groups[1] on gpu1: [] is not a non-empty list of GPU indices"),
        ({"gpu_groups": [["a"]]}, "ollama_gpu_groups[0] on gpu1: 'a' is not a whole number"),
        (
            {"cpu_instances": 2, "gpu_groups": [[0]]},
            "ollama_cpu_instances on gpu1: is set together with ollama_gpu_groups",
        ),
        ({"cpu_instances": -1}, "ollama_cpu_instances on gpu1: -1 is out of range"),
        (
            {"instance_overrides": {0: {"num_parallel": 0}}},
            "ollama_instance_overrides[0].num_parallel on gpu1: 0 is out",
        ),
    ],
)
def test_error_invalid_values(planner, gpus_from, config, start):
    msg = one_error(planner, gpus_from("l20x5.csv"), **config)
    assert msg.startswith(start), msg
    assert ". Fix: " in msg


def test_every_error_is_reported_at_once(planner, gpus_from):
    found = errors(
        planner,
        gpus_from("rtx4090x8.csv"),
        gpu_groups=[[0, 1], [1, 9]],
        keep_alive="-5x",
        num_paralel=3,
        kv_cache_type="q3",
    )
    assert len(found) == 5
    assert all(" on gpu1: " in m and ". Fix: " in m for m in found)


def test_bad_gpu_list(planner):
    msg = one_error(planner, [{"index": "x", "uuid": "GPU-1"}])
    assert msg.startswith("GPU list entry 0 on gpu1:")
    assert errors(planner, "nope")[0].startswith("GPU list on gpu1: str given")


def test_unknown_memory_skips_fit_check_with_warning(planner, gpus_from):
    gpus = gpus_from("na_fields.csv")  # GPU 1 reports [Not Supported] memory
    config = {"models": [{"name": "qwen2.5:7b", "vram_gib": 6}]}
    result = plan(planner, gpus, **config)
    assert [i["vram_mib"] for i in result] == [15360, 0]
    assert warnings(planner, gpus, **config) == [
        "ollama_models on gpu1: cannot check that qwen2.5:7b fits instance 1: nvidia-smi reports no memory size. "
        "Check the GPU's memory by hand."
    ]
