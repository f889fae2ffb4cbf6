"""nvidia_gpu_info: the pure parsers on captured-format nvidia-smi output, then main() with a mocked run_command."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from unittest import mock

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args

REPO = pathlib.Path(__file__).resolve().parents[4]


# -- parser ----------------------------------------------------------------------------------------------------
def test_l20_five_gpus(gpu_info, read_fixture):
    gpus = gpu_info.parse_query_output(read_fixture("l20x5.csv"))
    assert [g["index"] for g in gpus] == [0, 1, 2, 3, 4]
    first = gpus[0]
    assert first["name"] == "NVIDIA L20"
    assert first["uuid"].startswith("GPU-")
    assert first["pci_bus_id"] == "00000000:17:00.0"
    assert (first["memory_total_mib"], first["memory_used_mib"], first["memory_free_mib"]) == (46068, 1, 45589)
    assert first["driver_version"] == "550.127.05"
    assert first["compute_cap"] == "8.9"
    assert first["mig_mode"] is None  # [N/A] on boards without MIG
    assert first["mig_devices"] == []
    assert len({g["uuid"] for g in gpus}) == 5
    totals = gpu_info.host_summary(gpus)
    assert totals["gpu_count"] == 5
    assert totals["memory_total_mib"] == 5 * 46068
    assert totals["gpu_models"] == ["NVIDIA L20"]
    assert totals["mig_enabled"] is False


def test_rtx4090_eight_gpus(gpu_info, read_fixture):
    gpus = gpu_info.parse_query_output(read_fixture("rtx4090x8.csv"))
    assert len(gpus) == 8
    assert {g["name"] for g in gpus} == {"NVIDIA GeForce RTX 4090"}
    assert all(g["memory_total_mib"] == 24564 for g in gpus)


def test_na_and_not_supported_become_null(gpu_info, read_fixture):
    gpus = gpu_info.parse_query_output(read_fixture("na_fields.csv"))
    assert gpus[0]["memory_total_mib"] == 15360
    assert gpus[0]["memory_used_mib"] is None
    assert gpus[0]["compute_cap"] is None
    assert gpus[0]["mig_mode"] is None  # [Not Supported]
    assert gpus[1]["memory_total_mib"] is None  # [Not Supported]
    assert gpu_info.host_summary(gpus)["memory_total_mib"] == 15360


def test_mixed_cards(gpu_info, read_fixture):
    gpus = gpu_info.parse_query_output(read_fixture("a100_mixed.csv"))
    assert [g["memory_total_mib"] for g in gpus] == [81920, 40960, 23028]
    assert gpu_info.host_summary(gpus)["gpu_models"] == ["NVIDIA A10", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB"]
    assert [g["mig_mode"] for g in gpus] == ["Disabled", "Disabled", None]


def test_mig_devices_from_list(gpu_info, read_fixture):
    gpus = gpu_info.parse_query_output(read_fixture("h100_mig.csv"))
    assert [g["mig_mode"] for g in gpus] == ["Enabled", "Disabled"]
    devices = gpu_info.parse_mig_list(read_fixture("h100_mig_L.txt"))
    gpu_info.attach_mig_devices(gpus, devices)
    mig = gpus[0]["mig_devices"]
    assert [d["profile"] for d in mig] == ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
    assert [d["memory_mib"] for d in mig] == [40960, 20480, 10240, 10240]
    assert [d["index"] for d in mig] == [0, 1, 2, 3]
    assert all(d["uuid"].startswith("MIG-") for d in mig)
    assert gpus[1]["mig_devices"] == []
    assert gpu_info.host_summary(gpus)["mig_enabled"] is True


@pytest.mark.parametrize(
    ("profile", "mib"),
    [
        ("1g.10gb", 10240),
        ("3g.40gb", 40960),
        ("1g.5gb", 5120),
        ("1g.10gb+me", 10240),
        ("1c.3g.40gb", 40960),
        ("x", None),
    ],
)
def test_mig_profile_memory(gpu_info, profile, mib):
    assert gpu_info.mig_profile_memory_mib(profile) == mib


def test_garbage_line_is_quoted(gpu_info, read_fixture):
    with pytest.raises(gpu_info.NvidiaSmiParseError) as err:
        gpu_info.parse_query_output(read_fixture("garbage.txt"))
    assert "line 2" in str(err.value)
    assert "Unable to determine the device handle for GPU0000:3D:00.0: Unknown Error" in str(err.value)


def test_garbage_memory_is_quoted(gpu_info, read_fixture):
    with pytest.raises(gpu_info.NvidiaSmiParseError, match="memory_total_mib that is not a number: .*lots"):
        gpu_info.parse_query_output(read_fixture("garbage_memory.csv"))


def test_garbage_mig_list(gpu_info):
    with pytest.raises(gpu_info.NvidiaSmiParseError, match="'something else'"):
        gpu_info.parse_mig_list("GPU 0: NVIDIA H100 (UUID: GPU-1)\nsomething else\n")


def test_duplicate_index_rejected(gpu_info, read_fixture):
    line = read_fixture("l20x5.csv").splitlines()[0]
    with pytest.raises(gpu_info.NvidiaSmiParseError, match="twice"):
        gpu_info.parse_query_output(line + "\n" + line + "\n")


@pytest.mark.parametrize(
    ("name", "status"),
    [("no_devices.txt", "no_devices"), ("no_driver.txt", "no_driver"), ("nvml_mismatch.txt", "no_driver")],
)
def test_classify_failure(gpu_info, read_fixture, name, status):
    assert gpu_info.classify_failure(read_fixture(name)) == status


def test_classify_unknown_failure(gpu_info):
    assert gpu_info.classify_failure("Segmentation fault") is None


# -- main() ----------------------------------------------------------------------------------------------------
class _Exit(Exception):
    def __init__(self, kwargs, failed):
        super().__init__(kwargs)
        self.result = kwargs
        self.failed = failed


def _exit_json(self, **kwargs):
    raise _Exit(kwargs, False)


def _fail_json(self, msg, **kwargs):
    kwargs["msg"] = msg
    raise _Exit(kwargs, True)


def run_main(gpu_info, args, outputs, path="/usr/bin/nvidia-smi"):
    """Run main() with `args`; outputs maps a predicate on argv to (rc, stdout, stderr). Returns (result, calls)."""
    calls = []

    def run_command(self, argv, **kwargs):
        calls.append((argv, kwargs))
        for match, answer in outputs:
            if match(argv):
                return answer
        raise AssertionError(f"unexpected command {argv}")

    with (
        patch_module_args(args),
        mock.patch.multiple(basic.AnsibleModule, exit_json=_exit_json, fail_json=_fail_json, run_command=run_command),
        mock.patch.object(basic.AnsibleModule, "get_bin_path", return_value=path),
        pytest.raises(_Exit) as done,
    ):
        gpu_info.main()
    return done.value, calls


def is_query(argv):
    return any(a.startswith("--query-gpu=") for a in argv)


def is_list(argv):
    return argv[1:] == ["-L"]


def test_main_lists_gpus_with_c_locale(gpu_info, read_fixture):
    done, calls = run_main(gpu_info, {}, [(is_query, (0, read_fixture("l20x5.csv"), ""))])
    assert not done.failed
    result = done.result
    assert result["changed"] is False
    assert result["status"] == "ok" and result["present"] is True
    assert result["gpu_count"] == 5 and len(result["gpus"]) == 5
    assert result["driver_version"] == "550.127.05"
    argv, kwargs = calls[0]
    assert isinstance(argv, list) and argv[0] == "/usr/bin/nvidia-smi"
    assert argv[1] == "--query-gpu=" + ",".join(gpu_info.QUERY_FIELDS)
    assert argv[2] == "--format=csv,noheader,nounits"
    assert kwargs["environ_update"]["LC_ALL"] == "C"
    assert len(calls) == 1  # no MIG: no `nvidia-smi -L`


def test_main_check_mode_reads_the_same(gpu_info, read_fixture):
    done, _ = run_main(gpu_info, {"_ansible_check_mode": True}, [(is_query, (0, read_fixture("l20x5.csv"), ""))])
    assert not done.failed and done.result["gpu_count"] == 5


def test_main_mig_runs_list(gpu_info, read_fixture):
    done, calls = run_main(
        gpu_info,
        {},
        [(is_query, (0, read_fixture("h100_mig.csv"), "")), (is_list, (0, read_fixture("h100_mig_L.txt"), ""))],
    )
    assert not done.failed
    assert [c[0][1:] for c in calls][1] == ["-L"]
    assert len(done.result["gpus"][0]["mig_devices"]) == 4
    assert done.result["mig_enabled"] is True


def test_main_missing_fails_by_default(gpu_info):
    done, calls = run_main(gpu_info, {}, [], path=None)
    assert done.failed and done.result["status"] == "missing"
    assert "missing_ok" in done.result["msg"]
    assert calls == []


def test_main_missing_ok(gpu_info):
    done, _ = run_main(gpu_info, {"missing_ok": True}, [], path=None)
    assert not done.failed
    assert done.result["present"] is False and done.result["gpus"] == [] and done.result["status"] == "missing"


@pytest.mark.parametrize(
    ("fixture", "rc", "status"),
    [("no_devices.txt", 6, "no_devices"), ("no_driver.txt", 9, "no_driver"), ("nvml_mismatch.txt", 18, "no_driver")],
)
def test_main_no_usable_gpu(gpu_info, read_fixture, fixture, rc, status):
    done, _ = run_main(gpu_info, {}, [(is_query, (rc, read_fixture(fixture), ""))])
    assert not done.failed
    assert done.result["status"] == status and done.result["gpus"] == [] and done.result["present"] is True
    assert done.result["message"] == read_fixture(fixture).strip()
    done, _ = run_main(gpu_info, {"fail_on_error": True}, [(is_query, (rc, read_fixture(fixture), ""))])
    assert done.failed and status in done.result["msg"]


def test_main_no_devices_with_exit_zero(gpu_info):
    done, _ = run_main(gpu_info, {}, [(is_query, (0, "No devices were found\n", ""))])
    assert not done.failed and done.result["status"] == "no_devices"


def test_main_old_driver_retries_without_compute_cap(gpu_info, read_fixture):
    def first(argv):
        return is_query(argv) and "compute_cap" in argv[1]

    def second(argv):
        return is_query(argv) and "compute_cap" not in argv[1]

    done, calls = run_main(
        gpu_info,
        {},
        [
            (first, (2, read_fixture("old_driver_no_compute_cap.txt"), "")),
            (second, (0, read_fixture("old_driver.csv"), "")),
        ],
    )
    assert not done.failed, done.result
    assert len(calls) == 2
    assert [g["compute_cap"] for g in done.result["gpus"]] == [None, None]
    assert done.result["gpus"][0]["name"] == "Tesla P100-PCIE-16GB"


def test_main_garbage_fails_quoting_line(gpu_info, read_fixture):
    done, _ = run_main(gpu_info, {}, [(is_query, (0, read_fixture("garbage.txt"), ""))])
    assert done.failed
    assert "Unable to determine the device handle" in done.result["msg"]


def test_main_unknown_error_fails(gpu_info):
    done, _ = run_main(gpu_info, {}, [(is_query, (255, "", "Unknown Error"))])
    assert done.failed and "exit code 255" in done.result["msg"] and "Unknown Error" in done.result["msg"]


# -- documentation ----------------------------------------------------------------------------------------------
def test_ansible_doc_renders():
    env = dict(os.environ, ANSIBLE_DEPRECATION_WARNINGS="false", ANSIBLE_NOCOLOR="1")
    out = subprocess.run(
        [str(pathlib.Path(sys.executable).parent / "ansible-doc"), "-M", "plugins/modules", "nvidia_gpu_info"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for word in ("missing_ok", "fail_on_error", "mig_devices", "RETURN VALUES", "EXAMPLES"):
        assert word in out.stdout
