"""All-in-one host: every planned instance runs on its own GPU with its own model copy, behind the gateway."""

import json
import os
import subprocess
import sys

import yaml

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import env_file, gateway_spread, verified_layers  # noqa: E402

GPU_SPEC = json.load(open(os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "lab/gpus/l20x4.json")))
GPUS = GPU_SPEC["gpus"]
BASE_PORT = 11434
MODEL = "herd-tiny:1b"
# Both models host_vars configure are on every instance, both resident, named as Ollama reports them: the second
# is written without a tag (`herd-small`), which Ollama names herd-small:latest (test_model_names.py).
AS_REPORTED = {"herd-tiny:1b": "herd-tiny:1b", "herd-small": "herd-small:latest"}
with open(os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule/default/host_vars/herd-mol-aio.yml")) as _vars:
    MODELS = [AS_REPORTED[m["name"]] for m in yaml.safe_load(_vars)["ollama_models"]]


def test_every_instance_runs_and_listens_where_planned(host):
    for i, _gpu in enumerate(GPUS):
        svc = host.service(f"ollama@{i}")
        assert svc.is_enabled, f"ollama@{i} not enabled"
        assert svc.is_running, f"ollama@{i} not running:\n" + host.run(f"journalctl -u ollama@{i} -n 30").stdout
        assert host.socket(f"tcp://127.0.0.1:{BASE_PORT + i}").is_listening
    assert not host.service(f"ollama@{len(GPUS)}").is_running


def test_instances_own_their_gpu_by_uuid_and_their_models_dir(host):
    for i, gpu in enumerate(GPUS):
        env = env_file(host, i)
        assert env["CUDA_VISIBLE_DEVICES"] == gpu["uuid"]
        assert env["OLLAMA_HOST"] == f"127.0.0.1:{BASE_PORT + i}"
        assert env["OLLAMA_MODELS"] == f"/var/lib/herd/instances/{i}/models"
        assert env["OLLAMA_NUM_PARALLEL"] == "2"
        proc_env = host.run(f"cat /proc/$(systemctl show -p MainPID --value ollama@{i})/environ | tr '\\0' '\\n'")
        assert f"CUDA_VISIBLE_DEVICES={gpu['uuid']}" in proc_env.stdout


def test_each_instance_has_a_separate_verified_copy(host):
    inodes = []
    for i in range(len(GPUS)):
        models = f"/var/lib/herd/instances/{i}/models"
        layers = verified_layers(host, models)
        first = layers[0]["digest"].replace(":", "-")
        inodes.append(host.run(f"stat -c %i {models}/blobs/{first}").stdout.strip())
    assert len(set(inodes)) == len(GPUS), "copy mode must give every instance its own files"


def test_every_instance_has_both_models_resident(host):
    for i in range(len(GPUS)):
        ps = json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{BASE_PORT + i}/api/ps"))
        assert sorted(m["name"] for m in ps["models"]) == sorted(MODELS), (i, ps)
        assert all(m["size_vram"] == m["size"] for m in ps["models"])
        # herd's context (8192) and KV: weights + 2 slots x 8192 tokens x the model's KV per 1k tokens
        sizes = {m["name"]: m["size"] // 2**20 for m in ps["models"]}
        assert sizes == {"herd-tiny:1b": 1536 + 512, "herd-small:latest": 5632 + 896}, sizes
        assert {m["context_length"] for m in ps["models"]} == {8192}


def test_gateway_generates_and_spreads_over_every_instance(host):
    seen, bodies = gateway_spread(host, MODEL, 3 * len(GPUS), "/tmp/gen.json")
    assert all(body["response"] for body in bodies)
    assert seen == {f"127.0.0.1:{BASE_PORT + i}" for i in range(len(GPUS))}


def test_status_playbook_prints_every_instance_healthy(host):
    project = os.environ["MOLECULE_PROJECT_DIRECTORY"]
    # JSON result format: one table row per output line (the YAML format folds long rows).
    run = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], f"{project}/playbooks/status.yml"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, ANSIBLE_CALLBACK_RESULT_FORMAT="json"),
    )
    assert run.returncode == 0, run.stdout[-3000:]
    rows = [ln for ln in run.stdout.splitlines() if '"ollama@' in ln]
    assert len(rows) == len(GPUS), run.stdout[-3000:]
    for i, row in enumerate(rows):
        assert f"ollama@{i}" in row and f"{BASE_PORT + i}" in row and " active " in row and " ok " in row
        assert ", ".join(f"{name} resident" for name in MODELS) in row, row
