"""The nvidia-smi stand-in: nvidia-smi's output format and exit codes for each spec state."""

import json
import subprocess

import pytest
from herd_testing import load_module
from standins_lab import GPUS, NVIDIA_SMI

QUERY = "index,uuid,name,pci.bus_id,memory.total,memory.used,memory.free,driver_version,compute_cap,mig.mode.current"


def smi(*args, spec="l20x4", env_extra=None):
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    env["HERD_LAB_GPU_SPEC"] = str(GPUS / f"{spec}.json") if spec else "/nonexistent/gpus.json"
    env.update(env_extra or {})
    proc = subprocess.run([str(NVIDIA_SMI), *args], capture_output=True, text=True, env=env, timeout=10, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_query_noheader_nounits_l20():
    rc, out, _ = smi(f"--query-gpu={QUERY}", "--format=csv,noheader,nounits")
    spec = json.loads((GPUS / "l20x4.json").read_text())
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 4
    first = spec["gpus"][0]
    assert lines[0] == f"0, {first['uuid']}, NVIDIA L20, 00000000:17:00.0, 46068, 0, 46068, 550.127.05, 8.9, Disabled"
    assert [line.split(", ")[0] for line in lines] == ["0", "1", "2", "3"]


def test_query_with_header_and_units():
    rc, out, _ = smi("--query-gpu=index,name,memory.total,memory.free,utilization.gpu,power.draw", "--format=csv")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "index, name, memory.total [MiB], memory.free [MiB], utilization.gpu [%], power.draw [W]"
    assert lines[1] == "0, NVIDIA L20, 46068 MiB, 46068 MiB, 0 %, 22.50 W"


def test_header_keeps_units_with_nounits():
    rc, out, _ = smi("--query-gpu=memory.total", "--format=csv,nounits", spec="rtx4090x8")
    assert rc == 0
    assert out.splitlines()[:2] == ["memory.total [MiB]", "24564"]
    assert len(out.splitlines()) == 9


def test_separate_argument_forms_and_id_selection():
    rc, out, _ = smi("--query-gpu", "index,name", "--format", "csv,noheader", "-i", "2", spec="rtx4090x8")
    assert (rc, out) == (0, "2, NVIDIA GeForce RTX 4090\n")


def test_na_fields_on_mig_gpu():
    rc, out, _ = smi("--query-gpu=index,mig.mode.current,utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                     spec="h100-mig")
    assert rc == 0
    assert out.splitlines() == ["0, Enabled, [N/A], 37", "1, Enabled, [N/A], 87"]


def test_list_gpus_with_mig_devices():
    rc, out, _ = smi("-L", spec="h100-mig")
    spec = json.loads((GPUS / "h100-mig.json").read_text())
    lines = out.splitlines()
    assert rc == 0
    assert lines[0] == f"GPU 0: NVIDIA H100 80GB HBM3 (UUID: {spec['gpus'][0]['uuid']})"
    assert lines[1] == f"  MIG 3g.40gb     Device  0: (UUID: {spec['gpus'][0]['mig_devices'][0]['uuid']})"
    assert len(lines) == 2 + 2 + 7
    assert lines[3].startswith("GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-")


def test_list_gpus_plain():
    rc, out, _ = smi("--list-gpus", spec="rtx4090x8")
    assert rc == 0
    assert len(out.splitlines()) == 8
    assert all(line.startswith(f"GPU {i}: NVIDIA GeForce RTX 4090 (UUID: GPU-") for i, line in
               enumerate(out.splitlines()))


def test_unknown_field_exit_2():
    rc, out, _ = smi("--query-gpu=index,cuda_version", "--format=csv")
    assert rc == 2
    assert out == 'Field "cuda_version" is not a valid field to query.\n\n'


def test_older_driver_without_compute_cap(tmp_path):
    spec = json.loads((GPUS / "l20x4.json").read_text())
    spec["unsupported_fields"] = ["compute_cap"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(spec))
    rc, out, _ = smi("--query-gpu=index,compute_cap", "--format=csv", env_extra={"HERD_LAB_GPU_SPEC": str(path)})
    assert (rc, out) == (2, 'Field "compute_cap" is not a valid field to query.\n\n')
    rc, out, _ = smi("--query-gpu=index,name", "--format=csv,noheader", env_extra={"HERD_LAB_GPU_SPEC": str(path)})
    assert rc == 0 and out.startswith("0, NVIDIA L20\n")


@pytest.mark.parametrize("args", [("-L",), ("--query-gpu=index", "--format=csv,noheader,nounits")])
def test_no_devices_exit_6(args):
    rc, out, _ = smi(*args, spec="none")
    assert (rc, out) == (6, "No devices were found\n")


@pytest.mark.parametrize("spec", ["no-driver", None])
def test_driver_missing_exit_9(spec):
    rc, out, _ = smi("--query-gpu=index", "--format=csv,noheader,nounits", spec=spec)
    assert rc == 9
    assert out.startswith("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")


@pytest.mark.parametrize("args", [("--query-gpu=index",), ("--query-gpu=index", "--format=json"), ("--bogus",)])
def test_bad_arguments(args):
    rc, out, _ = smi(*args)
    assert rc == 2
    assert "Invalid combination of input arguments" in out


def test_uuids_are_well_formed_and_unique():
    import re

    seen = set()
    for path in GPUS.glob("*.json"):
        for gpu in json.loads(path.read_text())["gpus"]:
            assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", gpu["uuid"])
            assert gpu["uuid"] not in seen
            seen.add(gpu["uuid"])
            for mig in gpu.get("mig_devices", []):
                assert re.fullmatch(r"MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", mig["uuid"])
    assert len(seen) == 4 + 8 + 2


def test_inventory_module_parses_standin_output():
    """The real nvidia_gpu_info parser reads the stand-in's output (the contract of lab hosts)."""
    from pathlib import Path

    module_path = Path(__file__).resolve().parents[3] / "plugins" / "modules" / "nvidia_gpu_info.py"
    if not module_path.exists():
        pytest.skip("plugins/modules/nvidia_gpu_info.py not present")
    module = load_module("plugins/modules/nvidia_gpu_info.py", "herd_nvidia_gpu_info_for_standins")
    fields = list(module.QUERY_FIELDS)
    rc, out, _ = smi(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", spec="h100-mig")
    assert rc == 0
    gpus = module.parse_query_output(out, fields)
    assert [gpu["memory_total_mib"] for gpu in gpus] == [81559, 81559]
    assert [gpu["mig_mode"] for gpu in gpus] == ["Enabled", "Enabled"]
    rc, out, _ = smi("-L", spec="h100-mig")
    migs = module.parse_mig_list(out)
    assert sum(len(devices) for devices in migs.values()) == 9
