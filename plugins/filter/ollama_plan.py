# Copyright: herd contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Instance planner: turns a host's GPUs (nvidia_gpu_info's `gpus`) and the ollama_* knobs into its instance plan.

Filters:
  ollama_plan(gpus, config)           -> one run of the planner: {"instances": [instance dicts] (docs/architecture.md,
                                         "Instance plan"; [] when invalid), "errors": [messages naming the variable
                                         and the fix], "warnings": [messages about a valid but questionable plan]}
  ollama_not_ready(ps, warm)          -> warmup's readiness rule: the instances not ready, and why
  ollama_model_name(name)             -> the name as Ollama's /api/ps and /api/tags show it ("tiny" -> "tiny:latest");
                                         the rule lives in plugins/module_utils/ollama_names.py
  ollama_pull_name(name, registry)    -> the full name a model is pulled by ("tiny", "mirror:5000" ->
                                         "mirror:5000/library/tiny:latest"; no registry: "registry.ollama.ai/...")
  ollama_registry_error(registry)     -> '' when ollama_registry is a valid host[:port] (or empty), else the problem
  ollama_path_errors(paths)           -> messages for the folders ({variable: path}) that are not herd's own: a system
                                         folder, a folder holding another herd path, two settings on one tree
  ollama_rolling_batches(hosts, serial) -> the batches Ansible's `serial` makes of `hosts` (in order)
  ollama_rolling_floor_errors(hosts, hostvars, serial, max_share, by_instance)
                                      -> messages for the batches of a rolling re-deploy that would take more than
                                         max_share % of a model pool's slots out at once

`config` holds the role's knobs without the `ollama_` prefix (see DEFAULTS); docs/planner.md has the rules.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import ipaddress
import math
import os
import re
import sys

import yaml
from ansible.errors import AnsibleFilterError


def _load_names():
    """plugins/module_utils/ollama_names.py, the one home of the model name rule.

    Ansible puts ansible.cfg's module_utils folder on the path of modules only, not of controller plugins, so the
    filter loads the file beside it (the same relative place in a checkout and in a collection).
    """
    try:  # a test or another plugin may have imported it already
        from ansible.module_utils import ollama_names  # type: ignore[attr-defined]

        return ollama_names
    except ImportError:
        pass
    if "herd_ollama_names" in sys.modules:
        return sys.modules["herd_ollama_names"]
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "module_utils", "ollama_names.py")
    spec = importlib.util.spec_from_file_location("herd_ollama_names", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["herd_ollama_names"] = module
    spec.loader.exec_module(module)
    return module


ollama_names = _load_names()

# The planner's settings: role ollama's `ollama_<key>` variables. Their defaults have one source, the role's
# meta/argument_specs.yml (equal to its defaults/main.yml, tests/unit/test_argument_specs.py), read here from the
# same relative place in a checkout and in the installed collection.
SETTINGS = (
    "base_port", "bind_address", "advertise_address", "gpu_groups", "gpus_per_instance", "vram_headroom_pct",
    "cpu_instances", "use_mig", "num_parallel", "max_queue", "keep_alive", "max_loaded_models", "flash_attention",
    "load_timeout", "context_length", "no_cloud", "multiuser_cache", "kv_cache_type", "extra_env", "models",
    "instance_overrides", "data_dir", "mode", "version",
)
ARGUMENT_SPECS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "roles", "ollama", "meta",
    "argument_specs.yml",
)


def _spec_defaults():
    with open(ARGUMENT_SPECS, encoding="utf-8") as handle:
        options = yaml.safe_load(handle)["argument_specs"]["main"]["options"]
    return {key: options[f"ollama_{key}"].get("default") for key in SETTINGS}


DEFAULTS = {
    **_spec_defaults(),
    # Set by role ollama's plan.yml from facts, not from a variable of the same name.
    "host": "this host",
    "reserved_ports": [],
}

# Instance N runs as unit ollama@N.service or container herd-ollama-N (docs/architecture.md, "Instance plan").
UNIT_PREFIX = "ollama@"
CONTAINER_PREFIX = "herd-ollama-"

# Binds that only this host can reach (the instance firewall leaves them alone; no remote gateway can dial them).
LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1", "[::1]")
# Binds on every address: dialled locally on loopback.
ANY_BINDS = ("", "0.0.0.0", "::", "[::]")


def _bracket(address):
    """An address as it goes before `:port` in a URL or an nginx server line (IPv6 in brackets)."""
    address = str(address).strip("[]")
    return f"[{address}]" if ":" in address else address


def local_dial_address(bind):
    """The address a client on the instance's own host dials: loopback for a bind on every address (IPv6
    loopback for `::`), else the bind address itself; IPv6 in brackets."""
    bind = str(bind or "")
    if bind in ("", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    if bind in ("::", "[::]"):
        return "[::1]"
    return _bracket(bind)

OVERRIDE_KEYS = ("num_parallel", "models", "max_queue", "keep_alive")
MODEL_KEYS = ("name", "vram_gib", "kv_mib_per_1k_ctx", "instances")
KV_CACHE_TYPES = ("", "f16", "q8_0", "q4_0")
# Bytes of a KV cache entry relative to f16; Ollama quantizes the cache only with flash attention on.
KV_CACHE_FACTOR = {"": 1.0, "f16": 1.0, "q8_0": 0.5, "q4_0": 0.25}
# Default KV cache per model in MiB per 1024 tokens of context (f16, one parallel slot), by parameter count in
# billions: the largest figure among the common grouped-query-attention models of that size, from
# 2 (K and V) x layers x KV heads x head dim x 2 bytes: Llama 3.2 1B 32, Llama 3.2 3B 112, Llama 3.1 8B 128
# (Qwen2.5 7B 56), Qwen2.5 14B 192, Qwen2.5 32B 256, Llama 3.x 70B / Qwen2.5 72B 320. Models without grouped-query
# attention (Phi-3 mini: 384 at 3.8B) need more: give them kv_mib_per_1k_ctx. docs/planner.md, "Memory".
KV_MIB_PER_1K_BY_BILLIONS = ((2, 32), (4, 112), (9, 128), (15, 192), (35, 256), (math.inf, 320))
# When neither the name (":7b") nor vram_gib tells the size: the 8B figure.
KV_MIB_PER_1K_UNKNOWN = 128
# Weights of a Q4_K_M model: about 0.6 GiB per billion parameters (4.8 bits per weight + runtime buffers).
GIB_PER_BILLION_Q4 = 0.6
# Ollama >= 0.15.5 picks the context from the GPU memory when OLLAMA_CONTEXT_LENGTH is unset (before the model's
# trained limit, which the planner does not know): under 24 GiB 4k, 24-48 GiB 32k, 48 GiB and more 256k.
OLLAMA_DEFAULT_CONTEXT = ((24 * 1024, 4096), (48 * 1024, 32768), (math.inf, 262144))
PARAMS_IN_NAME = re.compile(r"(?<![0-9.])(\d+(?:\.\d+)?)[bB](?![A-Za-z0-9])")

# Environment the planner owns, and the knob that sets each.
MANAGED_ENV = {
    "CUDA_VISIBLE_DEVICES": "ollama_gpu_groups / ollama_cpu_instances",
    "OLLAMA_HOST": "ollama_bind_address / ollama_base_port",
    "OLLAMA_MODELS": "ollama_data_dir",
    "OLLAMA_NUM_PARALLEL": "ollama_num_parallel",
    "OLLAMA_MAX_QUEUE": "ollama_max_queue",
    "OLLAMA_KEEP_ALIVE": "ollama_keep_alive",
    "OLLAMA_MAX_LOADED_MODELS": "ollama_max_loaded_models",
    "OLLAMA_FLASH_ATTENTION": "ollama_flash_attention",
    "OLLAMA_LOAD_TIMEOUT": "ollama_load_timeout",
    "OLLAMA_CONTEXT_LENGTH": "ollama_context_length",
    "OLLAMA_KV_CACHE_TYPE": "ollama_kv_cache_type",
    "OLLAMA_NOPRUNE": "nothing: herd always sets it, ollama_model_sync and ollama_prune_models manage the blobs",
    "OLLAMA_NO_CLOUD": "ollama_no_cloud",
    "OLLAMA_MULTIUSER_CACHE": "ollama_multiuser_cache",
}

# OLLAMA_MULTIUSER_CACHE (envconfig.MultiUserCache: the runner's findBestCacheSlot, which forks a busy slot's prompt
# prefix into a free slot) exists from Ollama 0.3.13 ("Re-introduce the llama package (#5034)") up to, not including,
# 0.30.0, where "runner: Remove CGO engines, use llama-server exclusively for GGML models (#16031)" removed it: from
# 0.30 GGUF models run in an upstream llama-server subprocess, whose own host-memory prompt cache (--cache-ram,
# 8192 MiB by default) applies instead. ollama_multiuser_cache sets it only on releases that read it.
MULTIUSER_CACHE_SINCE = (0, 3, 13)
MULTIUSER_CACHE_UNTIL = (0, 30, 0)
OLLAMA_VERSION = re.compile(r"^\s*[vV]?(\d+)\.(\d+)(?:\.(\d+))?(?![0-9])")

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# Go's time.ParseDuration syntax, which Ollama uses after trying a plain integer number of seconds.
GO_DURATION = re.compile(r"^[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+$")
GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
GO_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
TRUE_STRINGS = ("true", "yes", "on", "1")
FALSE_STRINGS = ("false", "no", "off", "0")


class _Invalid(ValueError):
    """A knob's value is not usable; the message says why."""


def parse_duration(value):
    """Seconds Ollama reads from a duration knob: an integer of seconds or a Go duration ("5m", "1h30m", "-1").

    Raises _Invalid for anything Ollama cannot parse.
    """
    if isinstance(value, bool) or value is None:
        raise _Invalid(f"{value!r} is not a duration")
    if isinstance(value, int):
        return float(value)
    if not isinstance(value, str):
        raise _Invalid(f"{value!r} is not a duration")
    text = value.strip().strip("\"'")
    if re.fullmatch(r"[-+]?\d+", text):
        return float(int(text))
    if text == "0" or not GO_DURATION.match(text):
        raise _Invalid(f"{value!r} is not a duration")
    seconds = sum(float(num) * GO_UNIT_SECONDS[unit] for num, unit in GO_DURATION_PART.findall(text))
    return -seconds if text.startswith("-") else seconds


def _as_int(value):
    if isinstance(value, bool):
        raise _Invalid(f"{value!r} is a boolean, not a whole number")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Invalid(f"{value!r} is not a whole number")


def ollama_version_tuple(version):
    """(major, minor, patch) of an Ollama release as ollama_version names it ("0.34.2", "v0.20.1", "0.30.0-rc1",
    "0.5"); None when it names none."""
    if isinstance(version, bool) or not isinstance(version, (str, int, float)):
        return None
    found = OLLAMA_VERSION.match(str(version))
    if not found:
        return None
    return tuple(int(part or 0) for part in found.groups())


def multiuser_cache_applies(version):
    """Whether the release reads OLLAMA_MULTIUSER_CACHE (0.3.13 <= version < 0.30.0). A version the planner cannot
    read counts as a current release (0.30 or later): the variable is not set."""
    parsed = ollama_version_tuple(version)
    return parsed is not None and MULTIUSER_CACHE_SINCE <= parsed < MULTIUSER_CACHE_UNTIL


def _as_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS + FALSE_STRINGS:
        return value.strip().lower() in TRUE_STRINGS
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _Invalid(f"{value!r} is not true or false")


# The sizes a model entry may give, each with the fix its error message names.
MODEL_SIZE_FIXES = {
    "vram_gib": "give the model's weights in GiB (about its file size), or leave it out",
    "kv_mib_per_1k_ctx": "give the KV cache in MiB per 1024 tokens (2 x layers x KV heads x head dim x 2 bytes / 1024), "
    "or leave it out for the default from the parameter size",
}


def _as_number(value):
    if isinstance(value, bool):
        raise _Invalid(f"{value!r} is a boolean, not a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _Invalid(f"{value!r} is not a number")


def _ranges(indices):
    """Compact list of indices: [0, 1, 2, 5] -> '0-2, 5'."""
    out = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out) or "none"


def _gib(mib):
    return f"{mib / 1024:.1f} GiB"


# -- memory: one arithmetic for group sizing, the fit check and docs/planner.md ---------------------------------------
def parameter_billions(name, vram_gib=None):
    """Parameter count in billions from the name's size tag (":7b", ":1.5b", "-70b"), else from vram_gib at Q4; or None."""
    short = ollama_model_name(name)
    tag = short.rsplit(":", 1)[-1]
    model = short.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    for text in (tag, model):
        found = PARAMS_IN_NAME.findall(text)
        if found:
            return float(found[-1])
    if vram_gib:
        return float(vram_gib) / GIB_PER_BILLION_Q4
    return None


def default_kv_mib_per_1k(name, vram_gib=None):
    """KV cache MiB per 1024 tokens (f16, one slot) when the model entry gives no kv_mib_per_1k_ctx."""
    billions = parameter_billions(name, vram_gib)
    if billions is None:
        return KV_MIB_PER_1K_UNKNOWN
    return next(mib for limit, mib in KV_MIB_PER_1K_BY_BILLIONS if billions <= limit)


def ollama_default_context(vram_mib):
    """The context Ollama >= 0.15.5 picks itself from the instance's GPU memory (OLLAMA_CONTEXT_LENGTH unset)."""
    return next(ctx for limit, ctx in OLLAMA_DEFAULT_CONTEXT if vram_mib < limit)


def model_memory_mib(model, num_parallel, context_length, kv_cache_type="", flash_attention=True):
    """GPU memory one loaded model takes: {weights_mib, kv_mib, kv_mib_per_1k_ctx}; weights_mib None when unknown.

    KV = num_parallel x context_length / 1024 x kv_mib_per_1k_ctx x (0.5 for q8_0, 0.25 for q4_0 with flash attention),
    because Ollama sizes a runner's cache for num_parallel full contexts.
    """
    per_1k = model.get("kv_mib_per_1k_ctx") or default_kv_mib_per_1k(model["name"], model.get("vram_gib"))
    factor = KV_CACHE_FACTOR.get(kv_cache_type or "", 1.0) if flash_attention else 1.0
    kv = num_parallel * context_length / 1024 * per_1k * factor
    weights = model["vram_gib"] * 1024 if model.get("vram_gib") else None
    return {"weights_mib": weights, "kv_mib": kv, "kv_mib_per_1k_ctx": per_1k}


def resident_need_mib(models, num_parallel, context_length, kv_cache_type="", flash_attention=True, max_loaded=0,
                      headroom_pct=0):
    """Memory an instance needs to keep its models loaded together: the `max_loaded` largest (all when 0) models'
    weights + KV, plus headroom_pct. Models without vram_gib are not counted. Returns (need_mib, parts)."""
    parts = []
    for model in models:
        mem = model_memory_mib(model, num_parallel, context_length, kv_cache_type, flash_attention)
        if mem["weights_mib"] is not None:
            parts.append(dict(mem, name=model["name"], total_mib=mem["weights_mib"] + mem["kv_mib"]))
    parts.sort(key=lambda p: -p["total_mib"])
    if max_loaded:
        parts = parts[:max_loaded]
    need = sum(p["total_mib"] for p in parts) * (1 + headroom_pct / 100)
    return need, parts


class _Planner:
    """One planning run: collects errors and warnings and builds the plan when the config is valid."""

    def __init__(self, gpus, config):
        self.errors = []
        self.warnings = []
        self.plan = None
        self.cfg = copy.deepcopy(DEFAULTS)
        if isinstance(config, dict):
            self.cfg.update(copy.deepcopy(dict(config)))
        self.host = str(self.cfg.get("host") or DEFAULTS["host"])
        self.raw_config = config
        self.raw_gpus = gpus
        self.unknown_memory = set()

    # -- messages --------------------------------------------------------------------------------------------
    def error(self, var, problem, fix):
        self.errors.append(f"{var} on {self.host}: {problem}. Fix: {fix}")

    def warn(self, var, problem, hint):
        self.warnings.append(f"{var} on {self.host}: {problem}. {hint}")

    # -- scalar knobs ----------------------------------------------------------------------------------------
    def _int(self, key, minimum=None, maximum=None, fix="", var=None, value=None):
        var = var or f"ollama_{key}"
        value = self.cfg[key] if value is None else value
        try:
            number = _as_int(value)
        except _Invalid as exc:
            self.error(var, str(exc), fix)
            return None
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            span = f"{minimum}-{maximum}" if maximum is not None else f"at least {minimum}"
            self.error(var, f"{number} is out of range ({span})", fix)
            return None
        return number

    def _check_knobs(self):
        c = self.cfg
        k = {}
        k["base_port"] = self._int(
            "base_port", 1, 65535, "set ollama_base_port to a free port between 1024 and 65535 (default 11434)"
        )
        k["gpus_per_instance"] = self._int(
            "gpus_per_instance", 0, None, "use 0 (size groups from the models' vram_gib) or a GPU count such as 2"
        )
        k["vram_headroom_pct"] = self._int(
            "vram_headroom_pct", 0, 100, "use a percentage between 0 and 100 (default 10)"
        )
        k["cpu_instances"] = self._int(
            "cpu_instances", 0, 256, "use 0 on GPU hosts, or the number of CPU-only instances (e.g. 2)"
        )
        k["num_parallel"] = self._int("num_parallel", 1, None, "use a whole number of at least 1 (e.g. 4)")
        k["max_queue"] = self._int("max_queue", 1, None, "use a whole number of at least 1 (e.g. 128)")
        k["max_loaded_models"] = self._int(
            "max_loaded_models", 0, None, "use 0 (one per model the instance holds) or a whole number such as 2"
        )
        k["context_length"] = self._int(
            "context_length", 0, None, "use a token count such as 8192, or 0 for Ollama's GPU-memory-based default"
        )
        try:
            k["no_cloud"] = _as_bool(c["no_cloud"])
        except _Invalid as exc:
            self.error("ollama_no_cloud", str(exc), "use true or false")
        try:
            k["multiuser_cache"] = _as_bool(c["multiuser_cache"])
        except _Invalid as exc:
            self.error("ollama_multiuser_cache", str(exc), "use true or false")
        try:
            k["use_mig"] = _as_bool(c["use_mig"])
        except _Invalid as exc:
            self.error("ollama_use_mig", str(exc), "use true or false")
        if c["flash_attention"] is None or c["flash_attention"] == "":
            k["flash_attention"] = None
        else:
            try:
                k["flash_attention"] = _as_bool(c["flash_attention"])
            except _Invalid as exc:
                self.error("ollama_flash_attention", str(exc), "use true or false")
        self._check_keep_alive(c["keep_alive"], "ollama_keep_alive")
        k["keep_alive"] = c["keep_alive"]
        if c["load_timeout"] not in ("", None):
            try:
                if parse_duration(c["load_timeout"]) <= 0:
                    self.error(
                        "ollama_load_timeout",
                        f"{c['load_timeout']!r} is not a positive duration",
                        'use a duration such as "5m" or "10m", or "" for Ollama\'s default',
                    )
            except _Invalid as exc:
                self.error(
                    "ollama_load_timeout",
                    str(exc),
                    'use a duration such as "5m", "90s" or "1h30m", or a number of seconds',
                )
        if c["kv_cache_type"] is None:
            c["kv_cache_type"] = ""
        if c["kv_cache_type"] not in KV_CACHE_TYPES:
            self.error(
                "ollama_kv_cache_type",
                f"{c['kv_cache_type']!r} is not a KV cache type",
                'use "", "f16", "q8_0" or "q4_0"',
            )
        bind = c["bind_address"]
        if not isinstance(bind, str) or not self._valid_address(bind):
            self.error(
                "ollama_bind_address",
                f"{bind!r} is not an IP address or host name",
                "use an address of this host, 127.0.0.1, or 0.0.0.0 for all addresses",
            )
        advertise = c.get("advertise_address")
        if advertise not in ("", None) and (not isinstance(advertise, str)
                                            or not re.match(r"^[A-Za-z0-9._:\[\]-]+$", advertise)):
            self.error(
                "ollama_advertise_address",
                f"{advertise!r} is not an IP address or host name",
                "use the address (or DNS name) a gateway on another host dials to reach this host",
            )
        problem = path_problem(c["data_dir"])
        if problem:
            self.error("ollama_data_dir", problem, "use an absolute path of herd's own such as /var/lib/herd")
        self._check_extra_env()
        self.reserved = self._check_reserved_ports()
        return k

    @staticmethod
    def _valid_address(text):
        try:
            ipaddress.ip_address(text.strip("[]"))
            return True
        except ValueError:
            return bool(HOSTNAME.match(text))

    def _check_keep_alive(self, value, var):
        try:
            parse_duration(value)
        except _Invalid as exc:
            self.error(
                var,
                str(exc),
                'use a duration such as "5m" or "1h30m", a number of seconds, "-1" to keep models loaded forever, '
                'or "0" to unload at once',
            )
            return False
        return True

    def _check_extra_env(self):
        env = self.cfg["extra_env"]
        if env is None:
            self.cfg["extra_env"] = {}
            return
        if not isinstance(env, dict):
            self.error("ollama_extra_env", f"{env!r} is not a mapping", 'use a mapping such as {OLLAMA_DEBUG: "1"}')
            self.cfg["extra_env"] = {}
            return
        clean = {}
        for name, value in env.items():
            var = f"ollama_extra_env.{name}"
            if not isinstance(name, str) or not ENV_NAME.match(name):
                self.error(
                    "ollama_extra_env",
                    f"{name!r} is not an environment variable name",
                    "use names of letters, digits and underscores that do not start with a digit",
                )
                continue
            if name in MANAGED_ENV:
                self.error(
                    var,
                    f"{name} is set by herd itself",
                    f"remove it from ollama_extra_env and set {MANAGED_ENV[name]} instead",
                )
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (int, float)):
                value = str(value)
            if not isinstance(value, str):
                self.error(var, f"{value!r} is not a string", 'quote the value, e.g. "1"')
                continue
            clean[name] = str(value)
        self.cfg["extra_env"] = clean

    def _check_reserved_ports(self):
        reserved = {}
        ports = self.cfg["reserved_ports"] or []
        if not isinstance(ports, list):
            self.error("ollama_reserved_ports", f"{ports!r} is not a list", "use a list of port numbers")
            return reserved
        for item in ports:
            owner = "a port reserved on this host"
            value = item
            if isinstance(item, dict):
                value, owner = item.get("port"), str(item.get("owner") or owner)
            try:
                reserved[_as_int(value)] = owner
            except _Invalid as exc:
                self.error("ollama_reserved_ports", str(exc), "use a list of port numbers")
        return reserved

    # -- GPUs ------------------------------------------------------------------------------------------------
    def _check_gpus(self):
        gpus = self.raw_gpus
        if isinstance(gpus, dict) and "gpus" in gpus:
            gpus = gpus["gpus"]
        if gpus is None:
            gpus = []
        if not isinstance(gpus, list):
            self.error(
                "GPU list",
                f"{type(gpus).__name__} given where the `gpus` list of nvidia_gpu_info belongs",
                "pass the module's `gpus` result to the filter",
            )
            return []
        clean = []
        for pos, gpu in enumerate(gpus):
            try:
                if not isinstance(gpu, dict):
                    raise _Invalid("is not a mapping")
                index = _as_int(gpu.get("index"))
                uuid = gpu.get("uuid")
                if not isinstance(uuid, str) or not uuid:
                    raise _Invalid("has no uuid")
                memory = gpu.get("memory_total_mib")
                memory = None if memory is None else _as_int(memory)
            except _Invalid as exc:
                self.error(
                    f"GPU list entry {pos}",
                    f"{gpu!r} {exc}",
                    "pass the `gpus` list that nvidia_gpu_info returns",
                )
                continue
            mig_devices = []
            for dev in gpu.get("mig_devices") or []:
                mem = dev.get("memory_mib")
                mig_devices.append(
                    {
                        "uuid": str(dev.get("uuid")),
                        "profile": str(dev.get("profile") or "MIG"),
                        "memory_mib": None if mem is None else int(mem),
                    }
                )
            clean.append(
                {
                    "index": index,
                    "uuid": str(uuid),
                    "name": str(gpu.get("name") or "GPU"),
                    "memory_mib": memory,
                    "mig": gpu.get("mig_mode") == "Enabled",
                    "mig_devices": mig_devices,
                }
            )
        seen = set()
        for gpu in clean:
            if gpu["index"] in seen:
                self.error("GPU list", f"GPU index {gpu['index']} appears twice", "pass nvidia_gpu_info's `gpus` as is")
            seen.add(gpu["index"])
        return sorted(clean, key=lambda g: g["index"])

    # -- models ----------------------------------------------------------------------------------------------
    def _parse_model_entry(self, entry, var, allow_instances):
        """Return {name, vram_gib, instances} or None (after recording an error)."""
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            self.error(
                var, f"{entry!r} is not a model name or mapping", 'use "name:tag" or {name: "name:tag", vram_gib: 8}'
            )
            return None
        allowed = MODEL_KEYS if allow_instances else ("name", "vram_gib", "kv_mib_per_1k_ctx")
        unknown = [key for key in entry if key not in allowed]
        if unknown:
            self.error(var, f"unknown key(s) {', '.join(map(str, unknown))}", f"use only {', '.join(allowed)}")
            return None
        name = entry.get("name")
        try:
            name = ollama_model_name(name)
        except ValueError:
            self.error(var, f"{name!r} is not a model name", 'give the name as Ollama writes it, e.g. "qwen2.5:7b"')
            return None
        sizes = {}
        for key, fix in MODEL_SIZE_FIXES.items():
            value = entry.get(key)
            if value is not None:
                try:
                    value = _as_number(value)
                    if value <= 0:
                        raise _Invalid(f"{value!r} is not a positive size")
                except _Invalid as exc:
                    self.error(f"{var}.{key}", str(exc), fix)
                    return None
            sizes[key] = value
        instances = entry.get("instances")
        if instances is not None:
            try:
                if not isinstance(instances, list) or not instances:
                    raise _Invalid(f"{instances!r} is not a non-empty list of instance ids")
                instances = [_as_int(i) for i in instances]
            except _Invalid as exc:
                self.error(f"{var}.instances", str(exc), "list instance ids such as [0, 1], or leave it out for all")
                return None
        return {"name": name, "vram_gib": sizes["vram_gib"], "kv_mib_per_1k_ctx": sizes["kv_mib_per_1k_ctx"],
                "instances": instances}

    def _check_models(self):
        models = self.cfg["models"] or []
        if not isinstance(models, list):
            self.error("ollama_models", f"{models!r} is not a list", 'use a list such as ["qwen2.5:7b"]')
            return []
        parsed = []
        names = set()
        for pos, entry in enumerate(models):
            model = self._parse_model_entry(entry, f"ollama_models[{pos}]", True)
            if model is None:
                continue
            if model["name"] in names:
                self.error(
                    f"ollama_models[{pos}]",
                    f"{model['name']} is listed twice{self._spelled(entry, model['name'])}",
                    "list each model once",
                )
                continue
            names.add(model["name"])
            parsed.append(model)
        return parsed

    @staticmethod
    def _spelled(entry, name):
        written = entry.get("name") if isinstance(entry, dict) else entry
        return f" (written {written!r} here)" if written != name else ""

    def _memory_args(self, knobs, vram_mib=None):
        """(num_parallel, context_length, kv_cache_type, flash_attention) for the memory arithmetic."""
        ctx = knobs.get("context_length")
        if not ctx:
            ctx = ollama_default_context(vram_mib or 0)
        return knobs.get("num_parallel") or 1, ctx, self.cfg["kv_cache_type"] or "", knobs.get("flash_attention")

    # -- groups ----------------------------------------------------------------------------------------------
    @staticmethod
    def _whole(gpu):
        return {"gpu": gpu["index"], "uuid": gpu["uuid"], "name": gpu["name"], "memory_mib": gpu["memory_mib"]}

    def _mig_slots(self, gpu):
        return [
            [
                {
                    "gpu": gpu["index"],
                    "uuid": dev["uuid"],
                    "name": f"{gpu['name']} MIG {dev['profile']}",
                    "memory_mib": dev["memory_mib"],
                }
            ]
            for dev in gpu["mig_devices"]
        ]

    def _mig_problem(self, gpu, var, knobs, strict=True):
        """Record a problem and return True when a MIG GPU cannot serve as asked.

        A MIG GPU without MIG devices is an error when a group names it (strict) and a warning otherwise.
        """
        if not knobs.get("use_mig", True):
            self.error(
                var,
                f"GPU {gpu['index']} has MIG enabled but ollama_use_mig is false, so an instance pinned to the whole "
                "GPU would see no device",
                f"set ollama_use_mig: true, or disable MIG (nvidia-smi -i {gpu['index']} -mig 0 and reset the GPU)",
            )
            return True
        if not gpu["mig_devices"]:
            fix = (
                f"create MIG instances on GPU {gpu['index']} (nvidia-smi mig -i {gpu['index']} -cgi <profiles> -C) "
                f"or disable MIG on it (nvidia-smi -i {gpu['index']} -mig 0)"
            )
            if strict:
                self.error(
                    var,
                    f"GPU {gpu['index']} has MIG enabled but no MIG devices",
                    fix + ", or leave it out of ollama_gpu_groups",
                )
            else:
                self.warn(var, f"GPU {gpu['index']} has MIG enabled but no MIG devices and stays idle", f"Fix: {fix}.")
            return True
        return False

    def _explicit_slots(self, gpus, groups, knobs):
        by_index = {g["index"]: g for g in gpus}
        have = f"it has GPUs {_ranges(by_index)}" if by_index else "it has no GPU"
        slots = []
        owner = {}
        for pos, group in enumerate(groups):
            var = f"ollama_gpu_groups[{pos}]"
            if isinstance(group, (int, str)) and not isinstance(group, bool):
                group = [group]
            if not isinstance(group, list) or not group:
                self.error(
                    var, f"{group!r} is not a non-empty list of GPU indices", "write each group as a list, e.g. [0, 1]"
                )
                continue
            members = []
            for item in group:
                try:
                    index = _as_int(item)
                except _Invalid as exc:
                    self.error(var, f"{exc} (GPU indices are whole numbers)", "use indices from `nvidia-smi -L`")
                    continue
                if index not in by_index:
                    self.error(
                        var,
                        f"GPU {index} is not on this host ({have})",
                        "use indices from `nvidia-smi -L`, or leave ollama_gpu_groups empty for one instance per GPU",
                    )
                    continue
                if index in owner:
                    where = (
                        "twice in this group" if owner[index] == pos else f"also in ollama_gpu_groups[{owner[index]}]"
                    )
                    self.error(var, f"GPU {index} is {where}", "put every GPU in at most one group")
                    continue
                owner[index] = pos
                members.append(by_index[index])
            if len(members) != len(group):
                continue
            mig = [g for g in members if g["mig"]]
            if mig and len(members) > 1:
                self.error(
                    var,
                    f"GPU {mig[0]['index']} has MIG enabled and cannot share an instance with other GPUs",
                    f"give GPU {mig[0]['index']} a group of its own ([{mig[0]['index']}]): it becomes one instance "
                    "per MIG device",
                )
                continue
            if mig:
                if not self._mig_problem(mig[0], var, knobs):
                    slots.extend(self._mig_slots(mig[0]))
                continue
            slots.append([self._whole(g) for g in members])
        idle = [i for i in by_index if i not in owner]
        if idle and slots:
            self.warn(
                "ollama_gpu_groups",
                f"GPU(s) {_ranges(idle)} are in no group and stay idle",
                "Add them to a group to use them.",
            )
        if knobs.get("gpus_per_instance"):
            self.warn(
                "ollama_gpus_per_instance",
                "is ignored because ollama_gpu_groups is set",
                "Set it to 0 to silence this.",
            )
        return slots

    def _auto_slots(self, gpus, models, knobs):
        whole = []
        mig_slots = []
        for gpu in gpus:
            if gpu["mig"]:
                if not self._mig_problem(gpu, "ollama_use_mig", knobs, strict=False):
                    mig_slots.extend(self._mig_slots(gpu))
            else:
                whole.append(gpu)
        per = knobs.get("gpus_per_instance") or 0
        if whole and not per:
            per = 1
            needs = [m for m in models if m["vram_gib"]]
            known = [g["memory_mib"] for g in whole if g["memory_mib"]]
            if needs and known:
                # Size groups for what one instance keeps loaded: the models every instance holds, together
                # (or the largest restricted model alone, when that is more).
                args = self._memory_args(knobs, min(known))
                headroom = knobs.get("vram_headroom_pct") or 0
                everywhere = [m for m in needs if m["instances"] is None]
                candidates = [resident_need_mib(everywhere, *args, knobs.get("max_loaded_models") or 0, headroom)]
                candidates += [resident_need_mib([m], *args, 0, headroom) for m in needs if m["instances"]]
                need_mib, parts = max(candidates, key=lambda c: c[0])
                per = max(1, math.ceil(need_mib / min(known)))
                if per > len(whole):
                    names = ", ".join(p["name"] for p in parts)
                    self.error(
                        "ollama_models",
                        f"{names} need(s) about {_gib(need_mib)} with KV cache ({args[0]} x {args[1]} tokens) and "
                        f"headroom, which {per} GPUs of {_gib(min(known))} would hold, but this host has "
                        f"{len(whole)} GPU(s)",
                        "use a smaller model or quantization, lower ollama_num_parallel or ollama_context_length, "
                        "lower ollama_vram_headroom_pct, or serve it from a host with more GPUs",
                    )
                    return []
        elif per > len(whole):
            self.error(
                "ollama_gpus_per_instance",
                f"{per} GPUs per instance but this host has {len(whole)} GPU(s) without MIG",
                f"use at most {len(whole)}, or 0 to size groups from the models' vram_gib"
                if whole
                else "use 0, or set ollama_cpu_instances for a host without GPUs",
            )
            return []
        slots = (
            [[self._whole(g) for g in whole[i : i + per]] for i in range(0, len(whole) - per + 1, per)] if per else []
        )
        idle = [g["index"] for g in whole[len(slots) * per :]] if per else []
        if idle:
            self.warn(
                "ollama_gpus_per_instance",
                f"{per} GPUs per instance leaves GPU(s) {_ranges(idle)} idle",
                "Set ollama_gpu_groups to use them in a smaller group.",
            )
        slots.extend(mig_slots)
        # Stable sort: GPU index order, MIG devices of one GPU in their own order.
        return sorted(slots, key=lambda slot: slot[0]["gpu"])

    # -- the plan --------------------------------------------------------------------------------------------
    def run(self):
        config = self.raw_config
        if not isinstance(config, dict):
            self.error("planner config", f"{type(config).__name__} given", "pass a mapping of the ollama_* settings")
            return self
        for key in config:
            if key not in DEFAULTS:
                close = difflib.get_close_matches(str(key), list(DEFAULTS), n=1)
                fix = f"rename it to ollama_{close[0]}" if close else "remove it (known settings: docs/planner.md)"
                self.error(f"ollama_{key}", "is not a setting of the planner", fix)
        knobs = self._check_knobs()
        gpus = self._check_gpus()
        models = self._check_models()

        groups = self.cfg["gpu_groups"] or []
        if not isinstance(groups, list):
            self.error(
                "ollama_gpu_groups",
                f"{groups!r} is not a list of groups",
                "write e.g. [[0, 1], [2, 3]], or [] for automatic",
            )
            groups = []
        cpu = knobs.get("cpu_instances") or 0
        if cpu:
            if groups:
                self.error(
                    "ollama_cpu_instances",
                    "is set together with ollama_gpu_groups",
                    "use CPU-only mode (ollama_cpu_instances) or GPU groups, not both",
                )
            if knobs.get("gpus_per_instance"):
                self.error(
                    "ollama_cpu_instances",
                    "is set together with ollama_gpus_per_instance",
                    "set ollama_gpus_per_instance to 0 in CPU-only mode",
                )
            if gpus:
                self.warn(
                    "ollama_cpu_instances",
                    f"this host has {len(gpus)} GPU(s) but runs CPU-only instances",
                    "Set ollama_cpu_instances to 0 to use the GPUs.",
                )
            slots = [[] for _ in range(cpu)]
        elif groups:
            slots = self._explicit_slots(gpus, groups, knobs)
        else:
            slots = self._auto_slots(gpus, models, knobs)

        if not slots:
            if not self.errors:
                self.error(
                    "ollama_cpu_instances" if not gpus else "ollama_gpu_groups",
                    "the plan has zero instances" + ("" if gpus else " (no GPU found on this host)"),
                    "install the NVIDIA driver so nvidia-smi lists the GPUs, or set ollama_cpu_instances to run "
                    "CPU-only instances"
                    if not gpus
                    else "give at least one usable GPU group",
                )
            return self

        count = len(slots)
        self._check_ports(knobs.get("base_port"), count)
        for model in models:
            bad = [i for i in (model["instances"] or []) if not 0 <= i < count]
            if bad:
                self.error(
                    f"ollama_models ({model['name']}).instances",
                    f"instance(s) {_ranges(bad)} do not exist (this host has instances 0-{count - 1})",
                    "list only existing instance ids, or leave `instances` out for all",
                )
        overrides = self._check_overrides(count)
        if self.errors:
            return self

        plan = [self._instance(i, slot, knobs, models, overrides.get(i, {})) for i, slot in enumerate(slots)]
        self._check_residency(plan, overrides)
        self._check_fit(plan, models, overrides, knobs)
        if knobs.get("flash_attention") is not True and self.cfg["kv_cache_type"] in ("q8_0", "q4_0"):
            self.warn(
                "ollama_kv_cache_type",
                f"{self.cfg['kv_cache_type']} needs flash attention, which is not on",
                "Set ollama_flash_attention: true, or Ollama keeps an f16 cache.",
            )
        if not self.errors:
            self.plan = plan
        return self

    def _check_ports(self, base, count):
        if base is None:
            return
        last = base + count - 1
        if last > 65535:
            self.error(
                "ollama_base_port",
                f"{count} instances from port {base} would need ports up to {last}, beyond 65535",
                f"set ollama_base_port to at most {65535 - count + 1}",
            )
            return
        if base < 1024:
            self.warn(
                "ollama_base_port",
                f"ports {base}-{last} are privileged",
                "Instances running as an unprivileged user cannot bind them; prefer 11434.",
            )
        for port in range(base, last + 1):
            if port in self.reserved:
                self.error(
                    "ollama_base_port",
                    f"instance {port - base} would listen on port {port}, which {self.reserved[port]} already uses",
                    f"move ollama_base_port so that ports {base}-{last} avoid {port} (e.g. 11434)",
                )

    def _check_overrides(self, count):
        raw = self.cfg["instance_overrides"] or {}
        if not isinstance(raw, dict):
            self.error(
                "ollama_instance_overrides",
                f"{raw!r} is not a mapping",
                "use a mapping by instance id, e.g. {1: {num_parallel: 8}}",
            )
            return {}
        out = {}
        for key, value in raw.items():
            var = f"ollama_instance_overrides[{key}]"
            try:
                ident = _as_int(key)
            except _Invalid:
                self.error(var, f"{key!r} is not an instance id", f"use instance ids 0-{count - 1} as keys")
                continue
            if not 0 <= ident < count:
                self.error(
                    var,
                    f"instance {ident} does not exist (this host has instances 0-{count - 1})",
                    "use an existing instance id, or remove the override",
                )
                continue
            if not isinstance(value, dict):
                self.error(var, f"{value!r} is not a mapping", "use e.g. {num_parallel: 8}")
                continue
            clean = {}
            for name, item in value.items():
                item_var = f"{var}.{name}"
                if name not in OVERRIDE_KEYS:
                    self.error(item_var, "is not a per-instance setting", f"use only {', '.join(OVERRIDE_KEYS)}")
                elif name == "num_parallel":
                    clean[name] = self._int("num_parallel", 1, None, "use a whole number of at least 1", item_var, item)
                elif name == "max_queue":
                    clean[name] = self._int("max_queue", 1, None, "use a whole number of at least 1", item_var, item)
                elif name == "keep_alive":
                    if self._check_keep_alive(item, item_var):
                        clean[name] = item
                elif name == "models":
                    if not isinstance(item, list):
                        self.error(item_var, f"{item!r} is not a list", 'use a list such as ["qwen2.5:7b"]')
                        continue
                    parsed = [self._parse_model_entry(m, f"{item_var}[{i}]", False) for i, m in enumerate(item)]
                    if all(parsed):
                        clean[name] = parsed
            out[ident] = clean
        return out

    def _instance(self, ident, slot, knobs, models, override):
        c = self.cfg
        port = knobs["base_port"] + ident
        bind = c["bind_address"]
        host_port = f"{_bracket(bind)}:{port}"
        advertise = str(c.get("advertise_address") or self.host)
        models_dir = f"{c['data_dir'].rstrip('/')}/instances/{ident}/models"
        num_parallel = override.get("num_parallel") or knobs["num_parallel"]
        max_queue = override.get("max_queue") or knobs["max_queue"]
        keep_alive = override.get("keep_alive", c["keep_alive"])
        if "models" in override:
            names = [m["name"] for m in override["models"]]
        else:
            names = [m["name"] for m in models if m["instances"] is None or ident in m["instances"]]
        uuids = [d["uuid"] for d in slot]
        vram_mib = sum(d["memory_mib"] or 0 for d in slot)
        max_loaded = knobs["max_loaded_models"] or max(1, len(names))
        context_length = knobs["context_length"] or (ollama_default_context(vram_mib) if slot else 0)
        try:
            forever = parse_duration(keep_alive) < 0
        except _Invalid:
            forever = False
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(uuids) if uuids else "-1",
            "OLLAMA_HOST": host_port,
            "OLLAMA_MODELS": models_dir,
            "OLLAMA_NUM_PARALLEL": str(num_parallel),
            "OLLAMA_MAX_QUEUE": str(max_queue),
            "OLLAMA_KEEP_ALIVE": str(keep_alive).strip(),
            "OLLAMA_MAX_LOADED_MODELS": str(max_loaded),
            # Instances get their blobs from ollama_model_sync; Ollama must not delete them at start.
            "OLLAMA_NOPRUNE": "1",
        }
        if knobs.get("flash_attention") is not None:
            env["OLLAMA_FLASH_ATTENTION"] = "1" if knobs["flash_attention"] else "0"
        if c["load_timeout"] not in ("", None):
            env["OLLAMA_LOAD_TIMEOUT"] = str(c["load_timeout"]).strip()
        if knobs["context_length"]:
            env["OLLAMA_CONTEXT_LENGTH"] = str(knobs["context_length"])
        if knobs.get("no_cloud"):
            env["OLLAMA_NO_CLOUD"] = "1"
        # Only the releases that read it (0.3.13-0.29, see MULTIUSER_CACHE_SINCE); on 0.30+ llama-server's own
        # prompt cache applies and nothing is set.
        if knobs.get("multiuser_cache") and multiuser_cache_applies(c["version"]):
            env["OLLAMA_MULTIUSER_CACHE"] = "1"
        if c["kv_cache_type"]:
            env["OLLAMA_KV_CACHE_TYPE"] = c["kv_cache_type"]
        env.update(c["extra_env"])
        if any(d["memory_mib"] is None for d in slot):
            self.unknown_memory.add(ident)
        names_in_group = sorted({d["name"] for d in slot})
        if len(names_in_group) > 1:
            self.warn(
                f"instance {ident}",
                f"mixes GPU models ({', '.join(names_in_group)})",
                "Ollama splits layers by memory; the slower card sets the pace.",
            )
        # How it runs (docs/architecture.md): the systemd template unit or one container per instance; `name` is
        # the one a user types (systemctl status NAME, docker logs NAME). The only place these names are built.
        container = self.cfg["mode"] == "container"
        return {
            "id": ident,
            "mode": "container" if container else "systemd",
            "unit": None if container else f"{UNIT_PREFIX}{ident}.service",
            "container": f"{CONTAINER_PREFIX}{ident}" if container else None,
            "name": f"{CONTAINER_PREFIX}{ident}" if container else f"{UNIT_PREFIX}{ident}",
            "port": port,
            "bind_address": bind,
            "gpus": [d["gpu"] for d in slot],
            "gpu_uuids": uuids,
            "gpu_names": [d["name"] for d in slot],
            "vram_mib": vram_mib,
            "num_parallel": num_parallel,
            "max_queue": max_queue,
            "max_loaded_models": max_loaded,
            "context_length": context_length,
            # Readiness: every model resident (/api/ps) only when models stay loaded forever and all may be
            # loaded at once; otherwise "loads and answers" (finite keep_alive, or models taking turns).
            "keep_resident": forever and max_loaded >= len(names),
            "models": names,
            "models_dir": models_dir,
            "env": env,
            # How to reach it: local_url from this host; endpoint (host:port) from a gateway on another host.
            "loopback_only": bind in LOOPBACK_BINDS,
            "local_url": f"http://{local_dial_address(bind)}:{port}",
            "endpoint": f"{_bracket(advertise)}:{port}",
        }

    def _check_fit(self, plan, models, overrides, knobs):
        """Every instance keeps the models it may load at once in its GPU memory: weights + KV + headroom."""
        headroom = knobs.get("vram_headroom_pct") or 0
        by_name = {m["name"]: m for m in models}
        for inst in plan:
            if not inst["gpus"]:
                continue
            override = overrides.get(inst["id"], {})
            local = {m["name"]: m for m in override.get("models", [])}
            var = f"ollama_instance_overrides[{inst['id']}].models" if "models" in override else "ollama_models"
            held = [local.get(n) or by_name.get(n) for n in inst["models"]]
            sized = [m for m in held if m and m["vram_gib"]]
            if not sized:
                continue
            if inst["id"] in self.unknown_memory:
                for m in sized:
                    self.warn(
                        var,
                        f"cannot check that {m['name']} fits instance {inst['id']}: nvidia-smi reports no memory size",
                        "Check the GPU's memory by hand.",
                    )
                continue
            knobs_here = dict(knobs, num_parallel=inst["num_parallel"], context_length=inst["context_length"])
            args = self._memory_args(knobs_here, inst["vram_mib"])
            gpus = ", ".join(f"{i}: {n}" for i, n in zip(inst["gpus"], inst["gpu_names"], strict=True))
            where = f"instance {inst['id']} has {_gib(inst['vram_mib'])} (GPU {gpus})"
            kv_words = f"KV {args[0]} x {args[1]} tokens"
            alone_ok = True
            for m in sized:
                need, parts = resident_need_mib([m], *args, 0, headroom)
                if need > inst["vram_mib"]:
                    alone_ok = False
                    part = parts[0]
                    self.error(
                        var,
                        f"{m['name']} needs about {_gib(need)} ({m['vram_gib']:g} GiB + {kv_words} "
                        f"{_gib(part['kv_mib'])} + {headroom:g}% headroom) but {where}",
                        "give it a bigger group (ollama_gpu_groups, or ollama_gpus_per_instance 0 to size groups from "
                        "vram_gib), restrict the model to bigger instances with `instances:`, lower "
                        "ollama_num_parallel or ollama_context_length, or lower ollama_vram_headroom_pct",
                    )
            if not alone_ok or len(sized) < 2:
                continue
            need, parts = resident_need_mib(sized, *args, inst["max_loaded_models"], headroom)
            if need > inst["vram_mib"]:
                detail = " + ".join(
                    f"{p['name']} {_gib(p['weights_mib'])} + KV {_gib(p['kv_mib'])}" for p in parts
                )
                self.error(
                    var,
                    f"instance {inst['id']} holds {len(held)} models and may keep {len(parts)} loaded at once "
                    f"({', '.join(p['name'] for p in parts)}): they need about {_gib(need)} together ({detail}, "
                    f"KV for {args[0]} x {args[1]} tokens each, + {headroom:g}% headroom) but {where}",
                    "hold fewer models per instance, give the instance a bigger GPU group (ollama_gpu_groups), split "
                    "the models over instances with `instances:` on each model entry, lower ollama_num_parallel or "
                    "ollama_context_length, or let them take turns: ollama_max_loaded_models below the model count "
                    'with a finite ollama_keep_alive (e.g. "5m")',
                )

    def _check_residency(self, plan, overrides):
        """An explicit ollama_max_loaded_models below the models held contradicts a keep_alive of forever."""
        explicit = self.cfg.get("max_loaded_models")
        for inst in plan:
            held = len(inst["models"])
            if not explicit or inst["max_loaded_models"] >= held:
                continue
            keep_alive = inst["env"]["OLLAMA_KEEP_ALIVE"]
            try:
                forever = parse_duration(keep_alive) < 0
            except _Invalid:
                continue
            if not forever:
                continue
            source = (
                f"ollama_instance_overrides[{inst['id']}].keep_alive"
                if "keep_alive" in overrides.get(inst["id"], {})
                else "ollama_keep_alive"
            )
            self.error(
                "ollama_max_loaded_models",
                f"{inst['max_loaded_models']} loaded model(s) at a time, but instance {inst['id']} holds {held} "
                f"({', '.join(inst['models'])}) and {source} is {keep_alive!r} (keep every model loaded forever): "
                "the models would evict each other on every switch and none stays resident",
                f"let them take turns with a finite {source} (e.g. \"5m\"), or set ollama_max_loaded_models to "
                f"{held} (or 0: one per model held) if they fit together, or hold fewer models per instance "
                "(`instances:` on each model entry)",
            )


def ollama_model_name(name):
    """The name as Ollama's /api/ps and /api/tags show it: "tiny" -> "tiny:latest", "library/x:1b" -> "x:1b".

    Raises ValueError (AnsibleFilterError in a template) when the name is not valid. One rule for herd:
    plugins/module_utils/ollama_names.py.
    """
    return ollama_names.short_name(name)


# Folders herd must never take as its own: install prunes inside ollama_install_dir and teardown removes what herd
# created there, the model sync hands ollama_data_dir's store and instance folders to the ollama account.
SYSTEM_DIRS = frozenset(
    """/ /bin /boot /dev /etc /home /lib /lib32 /lib64 /libx32 /media /mnt /opt /proc /root /run /sbin /snap /srv /sys
    /tmp /usr /usr/bin /usr/include /usr/lib /usr/lib64 /usr/libexec /usr/local /usr/local/bin /usr/local/etc
    /usr/local/include /usr/local/lib /usr/local/sbin /usr/local/share /usr/local/src /usr/sbin /usr/share /usr/src
    /var /var/backups /var/cache /var/lib /var/local /var/lock /var/log /var/mail /var/opt /var/run /var/spool
    /var/tmp /etc/systemd /etc/default /var/lib/docker /var/lib/containerd""".split()
)
# Trees that are not disk folders (or are cleared at boot): nothing of herd's lives below them.
VIRTUAL_TREES = ("/proc", "/sys", "/dev", "/run", "/boot")
# Paths herd writes whatever the settings are (role ollama's vars/main.yml): no setting may hold or be below them.
FIXED_HERD_PATHS = {"/etc/herd/ollama": "herd's instance settings", "/usr/local/bin/ollama": "the ollama command link"}
PATH_FIX = "use a folder of herd's own, such as /opt/ollama for ollama_install_dir and /var/lib/herd for ollama_data_dir"


def _inside(path, parent):
    return parent == "/" or path == parent or path.startswith(parent + "/")


def path_problem(path):
    """What makes one folder unfit to be herd's own ('' when fit): not an absolute clean path, a system folder, a
    user's home, or a folder below /proc, /sys, /dev, /run or /boot."""
    if not isinstance(path, str) or not path.startswith("/") or re.search(r"\s", path):
        return f"{path!r} is not an absolute path without spaces"
    clean = path.rstrip("/") or "/"
    if os.path.normpath(clean) != clean:
        return f"{path!r} is not a plain path (no '.', '..' or '//' parts)"
    if clean in SYSTEM_DIRS:
        return f"{path!r} is a system folder: herd removes what it created there and hands folders to the ollama account"
    if re.match(r"^/(home/[^/]+|root)$", clean):
        return f"{path!r} is a user's home folder"
    for tree in VIRTUAL_TREES:
        if _inside(clean, tree):
            return f"{path!r} is below {tree}, which holds no folder of herd's own"
    return ""


def ollama_path_errors(paths):
    """Messages for every folder in paths ({variable: path}) that is not herd's own, [] when all are.

    Each one alone must pass path_problem; no two may be one folder or one inside the other, and none may hold or be
    below a path herd writes whatever the settings (FIXED_HERD_PATHS).
    """
    if not isinstance(paths, dict):
        raise AnsibleFilterError(f"ollama_path_errors expects a dict of variable: path, got {type(paths).__name__}")
    errors, clean = [], {}
    for var, path in paths.items():
        problem = path_problem(path)
        if problem:
            errors.append(f"{var}: {problem}. Fix: {PATH_FIX}")
        else:
            clean[var] = path.rstrip("/")
    names = list(clean)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pa, pb = clean[a], clean[b]
            if pa == pb:
                errors.append(f"{a} and {b}: both are {pa!r}. Fix: give each its own folder ({PATH_FIX})")
            elif _inside(pb, pa) or _inside(pa, pb):
                outer, inner = (a, b) if _inside(pb, pa) else (b, a)
                errors.append(
                    f"{outer}: {clean[outer]!r} holds {inner} ({clean[inner]!r}), so removing or pruning one would "
                    f"reach into the other. Fix: put them side by side, not one inside the other ({PATH_FIX})"
                )
        for fixed, what in FIXED_HERD_PATHS.items():
            if _inside(fixed, clean[a]) or _inside(clean[a], fixed):
                errors.append(
                    f"{a}: {clean[a]!r} overlaps {fixed} ({what}), which herd manages on its own. Fix: {PATH_FIX}"
                )
    return errors


def _model_name_filter(name):
    try:
        return ollama_model_name(name)
    except ValueError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def _pull_name_filter(name, registry=""):
    error = ollama_names.registry_error(registry)
    if error:
        raise AnsibleFilterError(f"ollama_registry {error}")
    try:
        return ollama_names.pull_name(name, registry)
    except ValueError as exc:
        raise AnsibleFilterError(str(exc)) from exc


def ollama_plan(gpus, config):
    """One run of the planner: the instances ([] when the settings are not valid), every error and every warning."""
    planner = _Planner(gpus, config).run()
    errors = list(planner.errors)
    return {"instances": [] if errors else planner.plan, "errors": errors, "warnings": list(planner.warnings)}


# For Python callers (tests, tools): the parts of one run.
def ollama_plan_errors(gpus, config):
    """Every problem with the config for this host, as messages naming the variable and the fix; [] when valid."""
    return ollama_plan(gpus, config)["errors"]


def ollama_plan_warnings(gpus, config):
    """Questionable but valid choices (idle GPUs, mixed cards in a group, ...); [] when none."""
    return ollama_plan(gpus, config)["warnings"]


def plan_instances(gpus, config):
    """The host's instance plan; raises AnsibleFilterError listing every problem."""
    result = ollama_plan(gpus, config)
    if result["errors"]:
        host = (config or {}).get("host", DEFAULTS["host"]) if isinstance(config, dict) else DEFAULTS["host"]
        raise AnsibleFilterError(f"ollama instance plan for {host} is not valid:\n- " + "\n- ".join(result["errors"]))
    return result["instances"]


def ollama_not_ready(ps_results, warm_results):
    """Warmup's readiness rule (roles/ollama/tasks/warmup.yml, docs/planner.md): the instances that are not ready.

    ps_results: the registered loop over ollama_instances reading /api/ps (each with `item` = the plan entry, `json`);
    warm_results: the registered loop over (instance, model) loading each model (`item` = [entry, model], `failed`,
    `json.response`, or `json.embeddings` for an embedding-only model). An instance is ready when every load
    succeeded and, with keep_resident, /api/ps lists every model it holds, fully in GPU memory on a GPU instance;
    without keep_resident, every model answered instead.
    Returns one dict per instance that is not: id, name, unit, container, failed, silent, missing, partial, loaded.
    """
    out = []
    for result in ps_results or []:
        inst = result["item"]
        resident = inst.get("keep_resident", True)
        warm = [w for w in warm_results or [] if w["item"][0]["id"] == inst["id"]]
        failed = [w["item"][1] for w in warm if w.get("failed")]
        silent = [] if resident else [
            w["item"][1] for w in warm
            if not w.get("failed") and not {"response", "embeddings"} & set(w.get("json") or {})
        ]
        models = (result.get("json") or {}).get("models") or []
        loaded = [ollama_model_name(m["name"]) for m in models]
        missing = []
        if resident:
            for name in (ollama_model_name(m) for m in inst.get("models", [])):
                if name not in loaded and name not in missing:
                    missing.append(name)
        partial = bool(resident and inst.get("gpus") and [m.get("size") for m in models] != [m.get("size_vram") for m in models])
        if failed or silent or missing or partial:
            out.append({"id": inst["id"], "name": inst.get("name"), "unit": inst.get("unit"),
                        "container": inst.get("container"), "failed": failed, "silent": silent, "missing": missing,
                        "partial": partial, "loaded": loaded})
    return out


def ollama_embedding_only(show_results):
    """The models an instance can only embed, from a registered loop of POST /api/show (`item` = the model name as
    the plan holds it, `json.capabilities`): "embedding" among the capabilities and no "completion" (Ollama derives
    them from the model file since 0.6: a pooling type makes an embedding model). A release without capabilities, or
    an answer that is not 200, counts as a completion model: it is warmed with a generate, as before."""
    out = []
    for result in show_results or []:
        caps = (result.get("json") or {}).get("capabilities") if result.get("status") == 200 else None
        if isinstance(caps, list) and "embedding" in caps and "completion" not in caps:
            out.append(result["item"])
    return out


def ollama_rolling_batches(hosts, serial):
    """The batches Ansible's play keyword `serial` makes of `hosts`, in order: a whole number, a percentage of all
    the hosts ("25%", rounded down, at least 1), or a list of these taken in turn, its last repeated."""
    hosts = list(hosts or [])
    steps = serial if isinstance(serial, (list, tuple)) else [serial]
    if not steps:
        raise AnsibleFilterError("herd_rolling_serial: an empty list. Fix: e.g. 1, 2 or 25%")
    sizes = []
    for step in steps:
        text = str(step).strip()
        try:
            size = max(1, int(len(hosts) * float(text[:-1]) / 100)) if text.endswith("%") else int(text)
        except ValueError:
            raise AnsibleFilterError(f"herd_rolling_serial: {step!r} is not a number of hosts or a percentage. "
                                     "Fix: e.g. 1, 2 or 25%") from None
        if size < 1:
            raise AnsibleFilterError(f"herd_rolling_serial: {step!r} takes no host. Fix: 1 or more, or a percentage")
        sizes.append(size)
    batches, start, index = [], 0, 0
    while start < len(hosts):
        size = sizes[min(index, len(sizes) - 1)]
        batches.append(hosts[start:start + size])
        start, index = start + size, index + 1
    return batches


def _pool_units(hosts, hostvars, by_instance):
    """{pool: {host: [slots of each unit]}}: a unit is what one roll takes out at once on a host (the whole host, or
    one instance when rolling by instance); a pool is a model, by the name Ollama shows."""
    units = {}
    for host in hosts:
        for inst in (hostvars.get(host) or {}).get("ollama_instances") or []:
            slots = int(inst.get("num_parallel") or 1)
            for model in inst.get("models") or []:
                try:
                    pool = ollama_names.short_name(model)
                except ValueError:
                    pool = str(model)
                per_host = units.setdefault(pool, {}).setdefault(host, [])
                if by_instance or not per_host:
                    per_host.append(slots)
                else:
                    per_host[0] += slots
    return units


def ollama_rolling_floor_errors(hosts, hostvars, serial=1, max_share=50, by_instance=False):
    """Messages for the batches of a rolling re-deploy (playbooks/rolling.yml) that would take more than
    `max_share` % of a model pool's slots out of rotation at once. A batch rolls its hosts together: each takes its
    whole host out (or, by instance, one instance at a time, so at worst its largest). What one host or instance
    holds alone is always allowed (a pool on one host cannot roll otherwise); the floor bounds what batching adds."""
    try:
        share = float(max_share)
    except (TypeError, ValueError):
        share = -1
    if not 0 < share <= 100:
        return [f"herd_rolling_max_pool_share={max_share!r} must be a percentage above 0 and at most 100. Fix: e.g. 50"]
    hosts = list(hosts or [])
    units = _pool_units(hosts, hostvars, bool(by_instance))
    errors = []
    for number, batch in enumerate(ollama_rolling_batches(hosts, serial), start=1):
        for pool, per_host in sorted(units.items()):
            total = sum(sum(u) for u in per_host.values())
            out = sum(max(per_host[h]) for h in batch if h in per_host)
            allowed = max(total * share / 100, max(max(u) for u in per_host.values()))
            if total and out > allowed:
                errors.append(
                    f"herd_rolling_serial={serial}: batch {number} ({', '.join(batch)}) would take {out} of the "
                    f"{total} slots of model {pool} out at once ({100 * out / total:.0f}%), above "
                    f"herd_rolling_max_pool_share={max_share}%. Fix: a smaller herd_rolling_serial (e.g. 1), "
                    "herd_rolling_by_instance=true, or a higher herd_rolling_max_pool_share")
    return errors


class FilterModule:
    """herd's instance planner filters."""

    def filters(self):
        return {
            "ollama_plan": ollama_plan,
            "ollama_model_name": _model_name_filter,
            "ollama_not_ready": ollama_not_ready,
            "ollama_embedding_only": ollama_embedding_only,
            "ollama_pull_name": _pull_name_filter,
            "ollama_registry_error": ollama_names.registry_error,
            "ollama_path_errors": ollama_path_errors,
            "ollama_rolling_batches": ollama_rolling_batches,
            "ollama_rolling_floor_errors": ollama_rolling_floor_errors,
        }
