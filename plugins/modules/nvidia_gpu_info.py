#!/usr/bin/python
# Copyright: herd contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: nvidia_gpu_info
short_description: Gather the NVIDIA GPUs of a host from nvidia-smi
description:
  - Runs C(nvidia-smi --query-gpu=... --format=csv,noheader,nounits) with C(LC_ALL=C) and returns one entry per GPU
    (index, UUID, name, PCI bus id, memory, driver version, compute capability, MIG mode) plus host totals.
  - When any GPU has MIG enabled, also runs C(nvidia-smi -L) and returns the MIG devices of each GPU.
  - Read-only; it never changes the host and runs the same in check mode.
  - Fields that nvidia-smi reports as C([N/A]), C([Not Supported]) or any other bracketed placeholder are returned as
    null.
  - Drivers older than R510 do not know the C(compute_cap) field; the module then asks again without it and returns
    C(compute_cap=null).
version_added: "1.0.0"
author:
  - herd contributors
options:
  missing_ok:
    description:
      - What to do when C(nvidia-smi) is not on the host.
      - V(false) fails the task.
      - V(true) returns C(present=false), C(status=missing) and an empty RV(gpus) list, for hosts that run without GPUs.
    type: bool
    default: false
  fail_on_error:
    description:
      - What to do when C(nvidia-smi) exists but finds no usable GPU, that is when the driver is not loaded
        (C(status=no_driver)) or when it prints C(No devices were found) (C(status=no_devices)).
      - V(false) returns an empty RV(gpus) list with that status and the tool's message.
      - V(true) fails the task with the tool's message.
      - Output that cannot be parsed always fails the task, quoting the offending line.
    type: bool
    default: false
  executable:
    description:
      - Path of C(nvidia-smi). By default it is looked up in E(PATH) and the usual driver directories.
    type: path
notes:
  - Supports check mode; the module is read-only.
  - MIG device memory is an estimate derived from the profile name (C(3g.40gb) gives 40 GiB = 40960 MiB); the real
    usable memory is a little lower.
seealso:
  - name: nvidia-smi documentation
    description: Query fields and their meaning (C(nvidia-smi --help-query-gpu)).
    link: https://docs.nvidia.com/deploy/nvidia-smi/index.html
attributes:
  check_mode:
    support: full
    description: Read-only; runs unchanged in check mode.
  diff_mode:
    support: none
    description: Changes nothing, so there is nothing to diff.
"""

EXAMPLES = r"""
- name: Gather the GPUs of the host
  nvidia_gpu_info:
  register: __ollama_gpu_info

- name: Gather GPUs where some hosts have none
  nvidia_gpu_info:
    missing_ok: true
  register: __ollama_gpu_info

- name: Fail when the driver is not loaded or no GPU is found
  nvidia_gpu_info:
    fail_on_error: true
  register: __ollama_gpu_info

# Ad hoc, from the repository root:
#   ansible gpu1 -m nvidia_gpu_info
"""

RETURN = r"""
present:
  description: Whether C(nvidia-smi) was found on the host.
  returned: always
  type: bool
  sample: true
status:
  description:
    - V(ok) when GPUs were listed, V(no_devices) when the tool found none, V(no_driver) when the driver is not
      loaded or does not answer, V(missing) when C(nvidia-smi) is absent and O(missing_ok=true).
  returned: always
  type: str
  sample: ok
message:
  description: The tool's own message when RV(status) is not V(ok); empty otherwise.
  returned: always
  type: str
  sample: "No devices were found"
nvidia_smi:
  description: Path of the C(nvidia-smi) that was run; empty when it is missing.
  returned: always
  type: str
  sample: /usr/bin/nvidia-smi
driver_version:
  description: Driver version of the first GPU; null when there is no GPU.
  returned: always
  type: str
  sample: "550.127.05"
gpu_count:
  description: Number of GPUs.
  returned: always
  type: int
  sample: 2
memory_total_mib:
  description: Sum of the GPUs' total memory in MiB (GPUs whose memory is unknown count 0).
  returned: always
  type: int
  sample: 92136
memory_free_mib:
  description: Sum of the GPUs' free memory in MiB at the time of the query.
  returned: always
  type: int
  sample: 91178
gpu_models:
  description: Distinct GPU names, sorted; more than one on hosts with mixed cards.
  returned: always
  type: list
  elements: str
  sample: ["NVIDIA L20"]
mig_enabled:
  description: Whether at least one GPU has MIG enabled.
  returned: always
  type: bool
  sample: false
gpus:
  description: One entry per GPU, in index order.
  returned: always
  type: list
  elements: dict
  contains:
    index:
      description: GPU index as nvidia-smi numbers it.
      type: int
      sample: 0
    uuid:
      description: GPU UUID; pin instances with it.
      type: str
      sample: GPU-5f1c2b9e-0c1d-4f4e-9a57-3c1f2e6b7a01
    name:
      description: Product name.
      type: str
      sample: NVIDIA L20
    pci_bus_id:
      description: PCI bus id.
      type: str
      sample: "00000000:17:00.0"
    memory_total_mib:
      description: Total memory in MiB; null when not reported.
      type: int
      sample: 46068
    memory_used_mib:
      description: Used memory in MiB; null when not reported.
      type: int
      sample: 0
    memory_free_mib:
      description: Free memory in MiB; null when not reported.
      type: int
      sample: 45589
    driver_version:
      description: Driver version.
      type: str
      sample: "550.127.05"
    compute_cap:
      description: CUDA compute capability; null when not reported or the driver predates the field.
      type: str
      sample: "8.9"
    mig_mode:
      description: Current MIG mode, V(Enabled) or V(Disabled); null on GPUs without MIG.
      type: str
      sample: Disabled
    mig_devices:
      description: MIG devices of the GPU (empty unless MIG is enabled and instances exist).
      type: list
      elements: dict
      contains:
        index:
          description: MIG device number within the GPU.
          type: int
          sample: 0
        uuid:
          description: MIG device UUID, usable in C(CUDA_VISIBLE_DEVICES).
          type: str
          sample: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f
        profile:
          description: MIG profile name.
          type: str
          sample: 1g.10gb
        memory_mib:
          description: Memory estimated from the profile name (GB in the name times 1024); null when not derivable.
          type: int
          sample: 10240
"""

# Ansible modules open with their documentation strings, so the imports follow them.
import csv  # noqa: E402
import re  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

QUERY_FIELDS = (
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "memory.total",
    "memory.used",
    "memory.free",
    "driver_version",
    "compute_cap",
    "mig.mode.current",
)

# Result keys for each query field.
FIELD_KEYS = {
    "index": "index",
    "uuid": "uuid",
    "name": "name",
    "pci.bus_id": "pci_bus_id",
    "memory.total": "memory_total_mib",
    "memory.used": "memory_used_mib",
    "memory.free": "memory_free_mib",
    "driver_version": "driver_version",
    "compute_cap": "compute_cap",
    "mig.mode.current": "mig_mode",
}

INT_KEYS = ("memory_total_mib", "memory_used_mib", "memory_free_mib")
REQUIRED_KEYS = ("index", "uuid", "name")

NO_DEVICES_MARKERS = ("no devices were found",)
NO_DRIVER_MARKERS = (
    "couldn't communicate with the nvidia driver",
    "failed to initialize nvml",
    "couldn't find libnvidia-ml.so",
    "driver/library version mismatch",
    "nvml library not found",
)
UNKNOWN_FIELD_MARKER = "is not a valid field to query"

MIG_GPU_LINE = re.compile(r"^GPU\s+(?P<index>\d+):\s*(?P<name>.*?)\s*\(UUID:\s*(?P<uuid>[^)\s]+)\)\s*$")
MIG_DEVICE_LINE = re.compile(r"^MIG\s+(?P<profile>\S+)\s+Device\s+(?P<index>\d+):\s*\(UUID:\s*(?P<uuid>[^)\s]+)\)\s*$")
MIG_PROFILE_MEMORY = re.compile(r"(?:^|\.)(?P<gb>\d+(?:\.\d+)?)gb(?:\+|$)", re.IGNORECASE)


class NvidiaSmiParseError(ValueError):
    """nvidia-smi printed something this module does not understand."""


def na_to_none(value):
    """Return None for nvidia-smi placeholders such as [N/A] or [Not Supported], else the stripped value."""
    value = value.strip()
    if value == "" or value == "N/A" or (value.startswith("[") and value.endswith("]")):
        return None
    return value


def parse_query_output(text, fields=QUERY_FIELDS):
    """Parse `nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits` output into a list of GPU dicts."""
    gpus = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        values = next(csv.reader([line], skipinitialspace=True))
        if len(values) != len(fields):
            raise NvidiaSmiParseError(
                f"nvidia-smi output line {lineno} has {len(values)} fields, expected {len(fields)} "
                f"({','.join(fields)}): {raw!r}"
            )
        gpu = {}
        for field, value in zip(fields, values, strict=True):
            gpu[FIELD_KEYS[field]] = na_to_none(value)
        for key in REQUIRED_KEYS:
            if gpu[key] is None:
                raise NvidiaSmiParseError(f"nvidia-smi output line {lineno} has no {key}: {raw!r}")
        try:
            gpu["index"] = int(gpu["index"])
        except ValueError:
            raise NvidiaSmiParseError(
                f"nvidia-smi output line {lineno} has a GPU index that is not a number: {raw!r}"
            ) from None
        for key in INT_KEYS:
            if key in gpu and gpu[key] is not None:
                try:
                    gpu[key] = int(float(gpu[key]))
                except ValueError:
                    raise NvidiaSmiParseError(
                        f"nvidia-smi output line {lineno} has a {key} that is not a number: {raw!r}"
                    ) from None
        if gpu.get("mig_mode") not in (None, "Enabled", "Disabled"):
            raise NvidiaSmiParseError(
                f"nvidia-smi output line {lineno} has an unknown MIG mode {gpu['mig_mode']!r}: {raw!r}"
            )
        gpu.setdefault("compute_cap", None)
        gpu["mig_devices"] = []
        gpus.append(gpu)
    seen = set()
    for gpu in gpus:
        if gpu["index"] in seen:
            raise NvidiaSmiParseError(f"nvidia-smi listed GPU index {gpu['index']} twice")
        seen.add(gpu["index"])
    return sorted(gpus, key=lambda g: g["index"])


def classify_failure(text):
    """Return 'no_devices', 'no_driver' or None for the message nvidia-smi printed when it failed."""
    lowered = text.lower()
    if any(marker in lowered for marker in NO_DEVICES_MARKERS):
        return "no_devices"
    if any(marker in lowered for marker in NO_DRIVER_MARKERS):
        return "no_driver"
    return None


def mig_profile_memory_mib(profile):
    """Estimate a MIG device's memory from its profile name: '3g.40gb' -> 40960, '1g.10gb+me' -> 10240."""
    match = MIG_PROFILE_MEMORY.search(profile)
    if not match:
        return None
    return int(float(match.group("gb")) * 1024)


def parse_mig_list(text):
    """Parse `nvidia-smi -L` output into {gpu_uuid: [mig device dicts]}."""
    devices = {}
    current = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        gpu_match = MIG_GPU_LINE.match(line)
        if gpu_match:
            current = gpu_match.group("uuid")
            devices[current] = []
            continue
        mig_match = MIG_DEVICE_LINE.match(line)
        if mig_match and current is not None:
            profile = mig_match.group("profile")
            devices[current].append(
                {
                    "index": int(mig_match.group("index")),
                    "uuid": mig_match.group("uuid"),
                    "profile": profile,
                    "memory_mib": mig_profile_memory_mib(profile),
                }
            )
            continue
        raise NvidiaSmiParseError(f"nvidia-smi -L output line {lineno} is not a GPU or MIG device line: {raw!r}")
    return devices


def attach_mig_devices(gpus, mig_devices):
    """Put each GPU's MIG devices (from parse_mig_list) on it, matched by UUID."""
    for gpu in gpus:
        gpu["mig_devices"] = list(mig_devices.get(gpu["uuid"], [])) if gpu.get("mig_mode") == "Enabled" else []
    return gpus


def host_summary(gpus):
    """Host totals for a parsed GPU list."""
    return {
        "gpu_count": len(gpus),
        "memory_total_mib": sum(g.get("memory_total_mib") or 0 for g in gpus),
        "memory_free_mib": sum(g.get("memory_free_mib") or 0 for g in gpus),
        "driver_version": gpus[0].get("driver_version") if gpus else None,
        "gpu_models": sorted({g["name"] for g in gpus}),
        "mig_enabled": any(g.get("mig_mode") == "Enabled" for g in gpus),
    }


def empty_result(present, status, message, path):
    result = {"changed": False, "present": present, "status": status, "message": message, "nvidia_smi": path}
    result.update(host_summary([]))
    result["gpus"] = []
    return result


def main():
    module = AnsibleModule(
        argument_spec={
            "missing_ok": {"type": "bool", "default": False},
            "fail_on_error": {"type": "bool", "default": False},
            "executable": {"type": "path"},
        },
        supports_check_mode=True,
    )
    env = {"LC_ALL": "C", "LANG": "C"}

    path = module.params["executable"] or module.get_bin_path(
        "nvidia-smi", required=False, opt_dirs=["/usr/bin", "/usr/local/nvidia/bin", "/usr/local/bin"]
    )
    if not path:
        if module.params["missing_ok"]:
            module.exit_json(**empty_result(False, "missing", "nvidia-smi not found", ""))
        module.fail_json(
            msg="nvidia-smi not found on this host (searched PATH, /usr/local/nvidia/bin). Install the NVIDIA "
            "driver, set executable, or set missing_ok=true for hosts without GPUs.",
            **empty_result(False, "missing", "nvidia-smi not found", ""),
        )

    fields = list(QUERY_FIELDS)

    def query(query_fields):
        argv = [path, f"--query-gpu={','.join(query_fields)}", "--format=csv,noheader,nounits"]
        return module.run_command(argv, environ_update=env, check_rc=False)

    rc, out, err = query(fields)
    if rc != 0 and UNKNOWN_FIELD_MARKER in (out + err) and "compute_cap" in (out + err):
        # Drivers before R510 have no compute_cap field.
        fields.remove("compute_cap")
        rc, out, err = query(fields)

    combined = "\n".join(part.strip() for part in (out, err) if part.strip())
    # Some driver builds exit 0 after printing "No devices were found"; judge by the message too.
    status = classify_failure(combined) if (rc != 0 or combined.lower() in NO_DEVICES_MARKERS) else None
    if status is not None:
        result = empty_result(True, status, combined, path)
        if module.params["fail_on_error"]:
            module.fail_json(msg=f"nvidia-smi on this host found no usable GPU ({status}): {combined}", **result)
        module.exit_json(**result)
    if rc != 0:
        module.fail_json(
            msg=f"nvidia-smi failed with exit code {rc}: {combined or '(no output)'}",
            rc=rc,
            stdout=out,
            stderr=err,
        )

    try:
        gpus = parse_query_output(out, fields)
    except NvidiaSmiParseError as exc:
        module.fail_json(msg=str(exc), stdout=out, stderr=err)

    if not gpus:
        result = empty_result(True, "no_devices", "nvidia-smi listed no GPU", path)
        if module.params["fail_on_error"]:
            module.fail_json(msg="nvidia-smi on this host listed no GPU", **result)
        module.exit_json(**result)

    if any(g.get("mig_mode") == "Enabled" for g in gpus):
        rc, lout, lerr = module.run_command([path, "-L"], environ_update=env, check_rc=False)
        if rc != 0:
            module.fail_json(msg=f"nvidia-smi -L failed with exit code {rc}: {(lout + lerr).strip()}", rc=rc)
        try:
            attach_mig_devices(gpus, parse_mig_list(lout))
        except NvidiaSmiParseError as exc:
            module.fail_json(msg=str(exc), stdout=lout, stderr=lerr)

    result = {"changed": False, "present": True, "status": "ok", "message": "", "nvidia_smi": path}
    result.update(host_summary(gpus))
    result["gpus"] = gpus
    module.exit_json(**result)


if __name__ == "__main__":
    main()
