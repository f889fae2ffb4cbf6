"""Container mode on an all-in-one GPU host: one container per planned instance, each on its own GPU (by UUID,
through Docker's nvidia device request), published where planned, with its own models dir, answering
/api/generate directly and through the gateway; a change to one instance recreates only its container."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import gateway_spread, playbook, verified_layers  # noqa: E402

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
GPUS = json.load(open(os.path.join(PROJECT, "lab/gpus/l20x4.json")))["gpus"][:2]  # ollama_gpu_groups [[0], [1]]
BASE_PORT = 11434
MODEL = "herd-tiny:1b"
HOOK_LOG = "/var/log/herd-lab/nvidia-container-runtime-hook.log"


def inspect(host, name):
    out = host.run(f"docker inspect {name}")
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout)[0]


def env_of(container):
    return dict(item.partition("=")[::2] for item in container["Config"]["Env"])


def test_every_planned_instance_runs_as_its_container(host):
    for i in range(len(GPUS)):
        c = inspect(host, f"herd-ollama-{i}")
        assert c["State"]["Running"], c["State"]
        assert c["Config"]["Image"].startswith("herd-lab/ollama:")
        assert c["Config"]["Entrypoint"] == ["/bin/ollama"] and c["Config"]["Cmd"] == ["serve"]
        assert c["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        assert c["Config"]["Labels"]["herd.ollama.instance"] == str(i)
    assert host.run(f"docker inspect herd-ollama-{len(GPUS)}").rc != 0, "only the planned instances may run"
    assert host.run("docker inspect herd-ollama-store").rc != 0, "the store container must be gone after the pull"
    assert not host.service(f"ollama@{0}").is_running, "container mode must not start the systemd units"


def test_each_container_is_published_only_where_planned(host):
    for i in range(len(GPUS)):
        port = BASE_PORT + i
        c = inspect(host, f"herd-ollama-{i}")
        assert c["HostConfig"]["PortBindings"] == {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        assert host.socket(f"tcp://127.0.0.1:{port}").is_listening
        assert not host.socket(f"tcp://0.0.0.0:{port}").is_listening
        env = env_of(c)
        assert env["OLLAMA_HOST"] == f"0.0.0.0:{port}"
        assert env["OLLAMA_MODELS"] == "/root/.ollama/models"
        assert env["OLLAMA_NUM_PARALLEL"] == "2"
        assert env["OLLAMA_MAX_QUEUE"] == "16"


def test_each_container_owns_its_gpu_by_uuid_through_the_nvidia_device_request(host):
    hook_calls = [json.loads(line) for line in host.file(HOOK_LOG).content_string.splitlines() if line.strip()]
    for i, gpu in enumerate(GPUS):
        c = inspect(host, f"herd-ollama-{i}")
        requests = c["HostConfig"]["DeviceRequests"]
        assert len(requests) == 1
        assert requests[0]["Driver"] == "nvidia"
        assert requests[0]["DeviceIDs"] == [gpu["uuid"]]
        assert requests[0]["Capabilities"] == [["gpu"]]
        assert env_of(c)["CUDA_VISIBLE_DEVICES"] == gpu["uuid"]
        # Docker's nvidia driver put the UUID into the process environment and ran the prestart hook for it.
        pid = c["State"]["Pid"]
        proc_env = host.run(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout.splitlines()
        assert f"NVIDIA_VISIBLE_DEVICES={gpu['uuid']}" in proc_env
        calls = [call for call in hook_calls if call["id"] == c["Id"]]
        assert calls and calls[-1]["args"] == ["prestart"] and calls[-1]["visible_devices"] == gpu["uuid"], calls


def test_each_container_has_its_own_models_dir_with_the_models_blobs(host):
    inodes = []
    for i in range(len(GPUS)):
        models = f"/var/lib/herd/instances/{i}/models"
        mounts = {m["Destination"]: m for m in inspect(host, f"herd-ollama-{i}")["Mounts"]}
        assert mounts["/root/.ollama/models"]["Source"] == models
        assert mounts["/root/.ollama/models"]["RW"] is True
        assert mounts["/etc/herd-lab/gpus.json"]["RW"] is False
        layers = verified_layers(host, models)
        inodes.append(host.check_output(f"stat -c %i {models}/blobs/" + layers[0]["digest"].replace(":", "-")))
        # The server inside the container sees exactly this copy.
        tags = json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{BASE_PORT + i}/api/tags"))
        assert [m["name"] for m in tags["models"]] == [MODEL]
    assert len(set(inodes)) == len(GPUS), "every instance must have its own files"


def test_every_container_has_the_model_loaded_on_its_gpu_and_generates(host):
    for i in range(len(GPUS)):
        port = BASE_PORT + i
        ps = json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{port}/api/ps"))
        assert [m["name"] for m in ps["models"]] == [MODEL]
        assert all(m["size_vram"] == m["size"] > 0 for m in ps["models"]), ps
        body = json.loads(host.check_output(
            f"curl -fsS http://127.0.0.1:{port}/api/generate "
            f"""-d '{{"model":"{MODEL}","prompt":"hi","stream":false,"options":{{"num_predict":4}}}}'"""))
        assert body["done"] is True and body["response"]


def test_gateway_spreads_over_every_container(host):
    seen, _ = gateway_spread(host, MODEL, 3 * len(GPUS), "/root/gen.json")
    assert seen == {f"127.0.0.1:{BASE_PORT + i}" for i in range(len(GPUS))}


def _identities(host):
    out = {}
    for i in range(len(GPUS)):
        c = inspect(host, f"herd-ollama-{i}")
        out[i] = (c["Id"], c["State"]["StartedAt"])
    return out


def test_changing_one_instance_recreates_only_its_container(host):
    before = _identities(host)
    overrides = json.dumps({"ollama_instance_overrides": {"1": {"num_parallel": 3}}})
    rc, out = playbook(f"{PROJECT}/site.yml", "--tags", "ollama", "-e", overrides)
    assert rc == 0, out[-5000:]
    after = _identities(host)
    assert after[1][0] != before[1][0], "herd-ollama-1 should have been recreated"
    assert {i: after[i] for i in after if i != 1} == {i: before[i] for i in before if i != 1}
    assert env_of(inspect(host, "herd-ollama-1"))["OLLAMA_NUM_PARALLEL"] == "3"
    assert env_of(inspect(host, "herd-ollama-0"))["OLLAMA_NUM_PARALLEL"] == "2"
    ps = json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{BASE_PORT + 1}/api/ps"))
    assert [m["name"] for m in ps["models"]] == [MODEL], "the recreated instance must be warmed again"
