#!/usr/bin/env python3
"""herd LAB STAND-IN: an Ollama API emulator. This is NOT Ollama and runs no model.

herd's lab has no GPU and no Ollama binary, so lab hosts get this single file
installed as ``bin/ollama`` (see lab/build-ollama-archive.sh) and started by the
real systemd unit / container command, ``ollama serve``. It speaks Ollama's HTTP
API with Ollama's JSON shapes and answers with made-up text at a configured
token rate, so load balancing, admission control, warmup and rolling re-deploys
are exercised for real. Python standard library only; asyncio; one process.

Environment honoured (same meaning as Ollama's):
  OLLAMA_HOST               bind address, parsed like envconfig.Host()
  OLLAMA_MODELS             model store in Ollama's on-disk layout
  OLLAMA_NUM_PARALLEL       slots per loaded model (default 1)
  OLLAMA_MAX_QUEUE          scheduler pending queue length (default 512)
  OLLAMA_KEEP_ALIVE         default keep-alive (default 5m; negative = forever; 0 = unload when idle)
  OLLAMA_MAX_LOADED_MODELS  loaded models before eviction (0 = automatic: 3 per GPU, 1 on CPU)
  OLLAMA_CONTEXT_LENGTH     context per slot (unset/0 = from GPU memory as since 0.15.5: under 24 GiB
                            4096, 24-48 GiB 32768, more 262144), capped at the model's trained context;
                            a loaded model takes weights + num_parallel x context of KV cache
  OLLAMA_NOPRUNE            "1": keep blobs no manifest references at start (default: delete them)
  OLLAMA_NO_CLOUD           "1": cloud models off (accepted and reported; the emulator has none)
  OLLAMA_MULTIUSER_CACHE    "1", with HERD_EMU_RUNNER=llamarunner only (Ollama 0.3.13-0.29; 0.30 removed it): the
                            runner's findBestCacheSlot (a busy slot's longest prefix forked into the least recently
                            used free slot) instead of findLongestCacheSlot (free slots only)
  LLAMA_ARG_CACHE_RAM       llama-server's --cache-ram in MiB (Ollama 0.30+ passes its environment on to the
                            llama-server it starts): the host-memory prompt cache (default 8192, 0 = off, -1 = no limit)
  LLAMA_ARG_CACHE_IDLE_SLOTS  llama-server's --cache-idle-slots: when a request takes a slot, every other idle slot's
                            prompt is saved in the host-memory prompt cache (default on; off/false/0/disabled)
  CUDA_VISIBLE_DEVICES      simulated GPUs owned, by index or GPU-UUID ("-1" or "" = none, CPU)
Lab-only environment:
  HERD_LAB_GPU_SPEC              GPU spec file (default /etc/herd-lab/gpus.json); missing = CPU only
  HERD_EMU_TOKENS_PER_SECOND     override every model's per-slot generation rate
  HERD_EMU_PROMPT_TOKENS_PER_SECOND  override every model's prompt-eval rate
  HERD_EMU_LOAD_SECONDS          override every model's load time
  HERD_EMU_BUSY_SLOWDOWN         per-slot rate multiplier with all slots busy, falling linearly from 1 with one
                                 (the old rule; unset: the measured batch curve BATCH_STEP_RATIOS, docs/standins.md)
  HERD_EMU_DISK_MB_PER_SECOND    disk read rate (10^6 bytes/s) of a cold load for a model stating no load_seconds
                                 (default 3000: a chosen figure for an NVMe drive, not a measured one)
  HERD_EMU_HOST_COPY_MB_PER_SECOND  rate (10^6 bytes/s) of llama-server's copies of a slot's KV state to and from its
                                 host-memory prompt cache (default 12000: a chosen figure for pageable host memory
                                 over PCIe 4.0 x16, not a measured one)
  HERD_EMU_RESPONSE_TOKENS       answer length when the request sets no num_predict (default 48)
  HERD_EMU_CPU_FACTOR            rate multiplier when no simulated GPU is visible (default 0.15)
  HERD_EMU_ACCESS_LOG            "0" turns off the per-request log line
  HERD_EMU_PROMPT_CACHE          "0" turns off the per-slot prompt cache (default on, as Ollama's runner)
  HERD_EMU_RUNNER                whose slot and prompt cache rules: "llama-server" (default: Ollama 0.30+, the
                                 version this emulator reports, docs/standins.md) or "llamarunner" (Ollama's own
                                 runner of 0.3.13-0.29, where OLLAMA_MULTIUSER_CACHE applies)
  HERD_EMU_EXTRA_PORTS           more instances served by this one process, each on its own port of
                                 OLLAMA_HOST's address with its own scheduler, slots and loaded models:
                                 "first-last" or a comma list (the scale benchmark's hundreds of instances);
                                 the instance of the i-th extra port sees the simulated GPU i+1 modulo the spec's

Where this differs from Ollama is written next to the code (look for "DIFFERS").
"""

import asyncio
import base64
import contextlib
import datetime
import email.utils
import hashlib
import http
import json
import math
import os
import re
import signal
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

VERSION = "0.34.2-herd-emulator"
BANNER = (
    f"herd LAB STAND-IN: this is herd's Ollama API emulator ({VERSION}), NOT Ollama. "
    "It runs no model and answers with made-up text at simulated GPU speed."
)

REGISTRY_HOST = "registry.ollama.ai"
MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DEFAULT_NAMESPACE = "library"
FOREVER = math.inf
GIB = 1024**3
MIB = 1024**2

# Texts taken from ollama/ollama server/sched.go and server/routes.go.
ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
WORDS = (
    "The herd lab emulator streams this answer at the token rate of a simulated GPU so that "
    "gateways queues and rolling deploys can be tested without a real model or accelerator"
).split()


# --------------------------------------------------------------------------- timing model (docs/standins.md)

# Decode step time of a llama.cpp runner against B, the slots generating at once: T(B) = t(B) / t(1). The server
# decodes one token of every generating slot in one batch, so each slot gets tokens_per_second / T(B) and the
# runner B times that. Measured by llama.cpp's llama-batched-bench in ggml-org/llama.cpp PR #16894 ("scripts : add
# script to bench models", 2025-10-31; sample output), qwen2 7B Q8_0 (7.62 B parameters) on Metal, PP 512, TG 32,
# S_TG (aggregate t/s) B=1 79.04, B=2 136.37, B=4 224.52, so T(B) = B x 79.04 / S_TG(B). Past B=4 (that run's
# last point) T grows as in ggml-org/llama.cpp PR #3776 (CUDA, PP 512, TG 128: S_TG 265.14, 450.38, 604.89, 796.67
# at B = 4, 8, 16, 32): T(2B) = T(B) x 2 x S_TG(B) / S_TG(2B). Linear between points, flat past the last. Per
# model: herd_lab "batch_step_ratios" ([[B, T], ...]); HERD_EMU_BUSY_SLOWDOWN brings back the old linear rule.
_T4 = 4 * 79.04 / 224.52
_T8 = _T4 * 2 * 265.14 / 450.38
_T16 = _T8 * 2 * 450.38 / 604.89
BATCH_STEP_RATIOS = ((1, 1.0), (2, 2 * 79.04 / 136.37), (4, _T4), (8, _T8), (16, _T16),
                     (32, _T16 * 2 * 604.89 / 796.67))
# Prompt evaluation is compute bound: its rate falls with the parameter count, rate = K / parameters, for a
# model that states no prompt_tokens_per_second. K from llama-bench on an RTX 4090 in ggml-org/llama.cpp PR #4766
# ("llama : ggml-backend integration", 2024-01-10): llama 7B Q4_0, 6.74 B parameters, pp 512 = 7979.85 t/s.
PREFILL_PARAMS_TOKENS_PER_SECOND = 7979.85 * 6.74e9
# A model stating neither prompt_tokens_per_second nor parameter_count (the emulator's rate before K).
DEFAULT_PROMPT_TOKENS_PER_SECOND = 1000.0
# Uncached prompt tokens evaluated per step (Ollama's num_batch default, llama.cpp's n_ubatch default).
PREFILL_CHUNK = 512
# llama-server's copies between a slot and its host-memory prompt cache (KV bytes / this rate, in 10^6 bytes/s): a
# chosen figure for pageable host memory over PCIe 4.0 x16 (31.5 GB/s per direction on the wire), not a measured one.
DEFAULT_HOST_COPY_MB_PER_SECOND = 12000
# llama-server's slot and prompt-cache defaults (ggml-org/llama.cpp common/common.h, the llama.cpp Ollama 0.30+
# builds; Ollama passes neither flag): --slot-prompt-similarity 0.1, --cache-ram 8192 MiB.
SLOT_PROMPT_SIMILARITY = 0.1
DEFAULT_CACHE_RAM_MIB = 8192
RUNNERS = ("llama-server", "llamarunner")
# how llama.cpp reads a flag from its LLAMA_ARG_* variable
LLAMA_TRUTHY = ("on", "enabled", "true", "1")
LLAMA_FALSEY = ("off", "disabled", "false", "0")
# Disk read rate of a cold load, 10^6 bytes/s (HERD_EMU_DISK_MB_PER_SECOND): chosen as a typical NVMe drive's
# sequential read, not measured.
DEFAULT_DISK_MB_PER_SECOND = 3000.0


def step_ratio(points, batch):
    """T(batch) from ((B, T), ...) sorted by B: linear between points, flat before the first and past the last."""
    prev_b, prev_t = points[0]
    if batch <= prev_b:
        return prev_t
    for b, t in points[1:]:
        if batch <= b:
            return prev_t + (t - prev_t) * (batch - prev_b) / (b - prev_b)
        prev_b, prev_t = b, t
    return prev_t


def parse_step_ratios(value):
    """herd_lab batch_step_ratios ([[B, T], ...] or {"B": T}) as sorted ((B, T), ...) starting at (1, 1.0);
    BATCH_STEP_RATIOS when absent or unusable."""
    pairs = value.items() if isinstance(value, dict) else value if isinstance(value, list) else ()
    points = {}
    for pair in pairs:
        try:
            batch, ratio = (float(x) for x in pair)
        except (TypeError, ValueError):
            return BATCH_STEP_RATIOS
        if batch < 1 or ratio <= 0:
            return BATCH_STEP_RATIOS
        points[batch] = ratio
    if not points:
        return BATCH_STEP_RATIOS
    points.setdefault(1.0, 1.0)
    return tuple(sorted(points.items()))


def prompt_rate_for(parameter_count):
    """Prompt tokens/s of a model from its parameter count (K / parameters), or the old default without one."""
    if parameter_count > 0:
        return PREFILL_PARAMS_TOKENS_PER_SECOND / parameter_count
    return DEFAULT_PROMPT_TOKENS_PER_SECOND


# --------------------------------------------------------------------------- environment


def clean_env(value):
    """envconfig.Var(): trim spaces and surrounding quotes."""
    return (value or "").strip().strip("\"'").strip()


def parse_ollama_host(value):
    """Parse OLLAMA_HOST like Ollama's envconfig.Host(); return (scheme, host, port).

    host "" means every address (Go's net.Listen(":PORT")).
    """
    text = clean_env(value)
    default_port = 11434
    scheme, sep, hostport = text.partition("://")
    if not sep:
        scheme, hostport = "http", text
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport = hostport.split("/", 1)[0]
    host, port = _split_host_port(hostport)
    if host is None:
        host, port = "127.0.0.1", str(default_port)
        bare = hostport.strip("[]")
        if _is_ip(bare):
            host = bare
        elif hostport:
            host = hostport
    try:
        port_num = int(port)
        if not 0 <= port_num <= 65535:
            raise ValueError(port)
    except ValueError:
        port_num = default_port
    return scheme, host, port_num


def _split_host_port(hostport):
    """Go's net.SplitHostPort: (host, port) or (None, None) when there is no port."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or not hostport[end + 1 :].startswith(":"):
            return None, None
        return hostport[1:end], hostport[end + 2 :]
    if hostport.count(":") != 1:
        return None, None
    host, port = hostport.split(":")
    return host, port


def _is_ip(text):
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text):
    """Go's time.ParseDuration, in seconds. Raises ValueError with Go's message."""
    orig = text
    sign = 1.0
    if text and text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{orig}"')
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match:
            if re.match(r"(\d+(?:\.\d*)?|\.\d+)$", text[pos:]):
                raise ValueError(f'time: missing unit in duration "{orig}"')
            raise ValueError(f'time: invalid duration "{orig}"')
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def parse_keep_alive_env(value, default=300.0):
    """OLLAMA_KEEP_ALIVE: integer seconds or Go duration; negative = forever; bad = default."""
    text = clean_env(value)
    if not text:
        return default
    try:
        seconds = float(int(text))
    except ValueError:
        try:
            seconds = parse_go_duration(text)
        except ValueError:
            return default
    return FOREVER if seconds < 0 else seconds


def parse_keep_alive_request(value):
    """api.Duration from a request: number = seconds, string = Go duration; negative = forever."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("json: cannot unmarshal bool into Go value of type api.Duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value)
    else:
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    return FOREVER if seconds < 0 else seconds


def env_int(environ, key, default, minimum=None):
    text = clean_env(environ.get(key))
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        log("WARN", "invalid setting, ignoring", **{key: text})
        return default
    if minimum is not None and value < minimum:
        log("WARN", "invalid setting, ignoring", **{key: text})
        return default
    return value


def env_float(environ, key):
    text = clean_env(environ.get(key))
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        log("WARN", "invalid setting, ignoring", **{key: text})
        return None


def load_gpu_spec(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def visible_gpus(spec, cuda_visible_devices):
    """GPUs of the spec this instance owns, in CUDA_VISIBLE_DEVICES order.

    None (unset) = all GPUs; "" or "-1" = none. Entries are indices or GPU-UUIDs;
    like CUDA, listing stops at the first entry that matches no device.
    """
    if spec is None or spec.get("state", "ok") != "ok":
        return []
    gpus = sorted(spec.get("gpus", []), key=lambda gpu: gpu["index"])
    if cuda_visible_devices is None:
        return gpus
    chosen = []
    for ident in clean_env(cuda_visible_devices).split(","):
        ident = ident.strip()
        if not ident:
            break
        match = [gpu for gpu in gpus if str(gpu["index"]) == ident or gpu.get("uuid") == ident]
        if not match or match[0] in chosen:
            break
        chosen.append(match[0])
    return chosen


def parse_ports(text):
    """HERD_EMU_EXTRA_PORTS: "" (none), "first-last" or "a,b,c"; ValueError on anything else."""
    if not text:
        return []
    if "-" in text:
        first, last = (int(x) for x in text.split("-", 1))
        ports = list(range(first, last + 1))
    else:
        ports = [int(x) for x in text.split(",")]
    if not ports or not all(0 < p < 65536 for p in ports):
        raise ValueError(f"HERD_EMU_EXTRA_PORTS={text!r}: ports 1-65535, as first-last or a comma list")
    return ports


class Settings:
    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        self.scheme, self.host, self.port = parse_ollama_host(env.get("OLLAMA_HOST", ""))
        models = env.get("OLLAMA_MODELS")
        self.models_dir = clean_env(models) if models else os.path.join(os.path.expanduser("~"), ".ollama", "models")
        # Ollama's default since 0.x: 1 slot per model. 0 also means default here.
        self.num_parallel = env_int(env, "OLLAMA_NUM_PARALLEL", 1) or 1
        self.max_queue = env_int(env, "OLLAMA_MAX_QUEUE", 512, minimum=1)
        self.keep_alive = parse_keep_alive_env(env.get("OLLAMA_KEEP_ALIVE"))
        self.max_loaded = env_int(env, "OLLAMA_MAX_LOADED_MODELS", 0, minimum=0)
        self.context_length = env_int(env, "OLLAMA_CONTEXT_LENGTH", 0, minimum=0)
        self.noprune = clean_env(env.get("OLLAMA_NOPRUNE")) not in ("", "0", "false")
        self.no_cloud = clean_env(env.get("OLLAMA_NO_CLOUD")) not in ("", "0", "false")
        self.gpu_spec_path = clean_env(env.get("HERD_LAB_GPU_SPEC")) or "/etc/herd-lab/gpus.json"
        self.cuda_visible_devices = env.get("CUDA_VISIBLE_DEVICES")
        self.tokens_per_second = env_float(env, "HERD_EMU_TOKENS_PER_SECOND")
        self.prompt_tokens_per_second = env_float(env, "HERD_EMU_PROMPT_TOKENS_PER_SECOND")
        self.load_seconds = env_float(env, "HERD_EMU_LOAD_SECONDS")
        self.busy_slowdown = env_float(env, "HERD_EMU_BUSY_SLOWDOWN")
        disk = env_float(env, "HERD_EMU_DISK_MB_PER_SECOND")
        self.disk_mb_per_second = disk if disk and disk > 0 else DEFAULT_DISK_MB_PER_SECOND
        copy = env_float(env, "HERD_EMU_HOST_COPY_MB_PER_SECOND")
        self.host_copy_mb_per_second = copy if copy and copy > 0 else DEFAULT_HOST_COPY_MB_PER_SECOND
        self.response_tokens = env_int(env, "HERD_EMU_RESPONSE_TOKENS", 48, minimum=1)
        self.cpu_factor = env_float(env, "HERD_EMU_CPU_FACTOR") or 0.15
        self.access_log = clean_env(env.get("HERD_EMU_ACCESS_LOG")) != "0"
        self.prompt_cache = clean_env(env.get("HERD_EMU_PROMPT_CACHE")) not in ("0", "false")
        # OLLAMA_MULTIUSER_CACHE (envconfig.MultiUserCache, a boolean): the runner's findBestCacheSlot instead of
        # findLongestCacheSlot (a busy slot's prefix is forked into the oldest free slot).
        self.multiuser_cache = clean_env(env.get("OLLAMA_MULTIUSER_CACHE")).lower() in ("1", "true", "t", "yes", "on")
        runner = clean_env(env.get("HERD_EMU_RUNNER")) or RUNNERS[0]
        if runner not in RUNNERS:
            raise SystemExit(f"HERD_EMU_RUNNER={runner!r}: use one of {', '.join(RUNNERS)}")
        self.runner = runner
        # llama-server reads LLAMA_ARG_CACHE_RAM (MiB; -1 = no limit, 0 = off) from the environment Ollama gives it.
        self.cache_ram_mib = env_int(env, "LLAMA_ARG_CACHE_RAM", DEFAULT_CACHE_RAM_MIB, minimum=-1)
        # and LLAMA_ARG_CACHE_IDLE_SLOTS (a flag, on by default), in llama.cpp's words for a flag's variable:
        # on/enabled/true/1 or off/disabled/false/0 (the emulator refuses anything else)
        idle = clean_env(env.get("LLAMA_ARG_CACHE_IDLE_SLOTS")).lower()
        if idle and idle not in LLAMA_TRUTHY + LLAMA_FALSEY:
            raise SystemExit(f"LLAMA_ARG_CACHE_IDLE_SLOTS={idle!r}: use one of {', '.join(LLAMA_TRUTHY + LLAMA_FALSEY)}")
        self.cache_idle_slots = idle not in LLAMA_FALSEY
        self.extra_ports = parse_ports(clean_env(env.get("HERD_EMU_EXTRA_PORTS")))

    @property
    def listen_address(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# --------------------------------------------------------------------------- logging and time


def log(level, msg, **attrs):
    parts = ["time={}".format(datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")),
             f"level={level}", "source=herd-emulator", f"msg={json.dumps(msg)}"]
    parts += [f"{key}={json.dumps(value) if isinstance(value, str) else value}" for key, value in attrs.items()]
    sys.stderr.write(" ".join(parts) + "\n")
    sys.stderr.flush()


_ts_cache = [0, ""]


def go_time(epoch=None):
    """UTC time as Go's JSON encoding writes it (RFC 3339 with fraction, Z)."""
    epoch = time.time() if epoch is None else epoch
    sec = int(epoch)
    if _ts_cache[0] != sec:
        _ts_cache[0] = sec
        _ts_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    frac = ("%.9f" % (epoch - sec))[2:].rstrip("0")
    return _ts_cache[1] + ("." + frac if frac else "") + "Z"


def go_time_far(seconds_from_now):
    """expires_at for a keep-alive; 'forever' is Ollama's now + MaxInt64 ns (about 292 years)."""
    if seconds_from_now == FOREVER:
        seconds_from_now = (2**63 - 1) / 1e9
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".") + "Z"


def human_gib(num_bytes):
    return "%.1f GiB" % (num_bytes / GIB)


# --------------------------------------------------------------------------- model store


class ModelError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_model_name(name):
    """'herd-tiny:1b' -> (host, namespace, model, tag) with Ollama's defaults; None when invalid."""
    name = (name or "").strip()
    if not name:
        return None
    rest, tag = name, "latest"
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = name.rsplit(":", 1)
    parts = rest.split("/")
    if len(parts) == 1:
        host, namespace, model = REGISTRY_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, namespace, model = REGISTRY_HOST, parts[0], parts[1]
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        return None
    if not all(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", part) for part in (namespace, model, tag)):
        return None
    return host, namespace, model, tag


def display_name(parsed):
    host, namespace, model, tag = parsed
    if host == REGISTRY_HOST and namespace == DEFAULT_NAMESPACE:
        return f"{model}:{tag}"
    if host == REGISTRY_HOST:
        return f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


# GGUF value types (ggml's gguf.h) -> struct format; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# Arrays longer than this are shown empty, like Ollama's show without "verbose" (ggml decode's array cap).
GGUF_ARRAY_SHOWN = 1024


def _shortest_f32(value):
    """The shortest decimal that reads back as the same float32, as Go's JSON encoder writes a float32."""
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", short))[0] == value:
            return short
    return value


def read_gguf_info(path):
    """A GGUF file's metadata as /api/show's model_info writes it (None when not a GGUF).

    Like Ollama: every key-value pair except general.name and tokenizer.chat_template, and
    general.parameter_count counted from the tensors when the file does not carry it.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(16 << 20)
    except OSError:
        return None
    if data[:4] != b"GGUF":
        return None
    pos = 4

    def take(fmt):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string():
        nonlocal pos
        length = take("<Q")
        pos += length
        return data[pos - length:pos].decode("utf-8", "replace")

    def value(vtype):
        if vtype == 8:
            return string()
        if vtype == 9:
            item_type, count = take("<I"), take("<Q")
            items = [value(item_type) for _ in range(count)]
            return items if count <= GGUF_ARRAY_SHOWN else []
        got = take(_GGUF_SCALARS[vtype])
        return _shortest_f32(got) if vtype == 6 else got

    try:
        _version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
        info = {}
        for _ in range(n_kv):
            key = string()
            info[key] = value(take("<I"))
        params = 0
        for _ in range(n_tensors):
            string()
            dims = [take("<Q") for _ in range(take("<I"))]
            take("<I")
            take("<Q")
            params += math.prod(dims)
    except (struct.error, KeyError, OverflowError):
        return None
    info.pop("general.name", None)
    info.pop("tokenizer.chat_template", None)
    info.setdefault("general.parameter_count", params)
    return dict(sorted(info.items()))


class ModelInfo:
    """One model in the store: manifest, config and the emulator's timing metadata."""

    def __init__(self, name, manifest_path, manifest_bytes, config, settings):
        self.name = name
        self.manifest_path = manifest_path
        self.manifest = json.loads(manifest_bytes)
        self.digest = hashlib.sha256(manifest_bytes).hexdigest()
        self.config = config
        self.modified = os.stat(manifest_path).st_mtime
        layers = self.manifest.get("layers", [])
        self.size = sum(layer.get("size", 0) for layer in layers) + self.manifest.get("config", {}).get("size", 0)
        lab = config.get("herd_lab") or {}
        model_bytes = sum(layer.get("size", 0) for layer in layers if layer.get("mediaType", "").endswith(".model"))
        # A model without herd_lab metadata (a real GGUF copied in) is treated as needing 1.2x its file size.
        self.vram_mib = int(lab.get("vram_mib") or max(1, model_bytes * 1.2 // MIB))
        self.parameter_count = int(lab.get("parameter_count", 0))
        # Cold load: HERD_EMU_LOAD_SECONDS, else the model's load_seconds, else its weights (vram_mib, or the
        # model file) read at HERD_EMU_DISK_MB_PER_SECOND.
        self.load_bytes = int(lab.get("vram_mib") or 0) * MIB or model_bytes
        if settings.load_seconds is not None:
            self.load_seconds = settings.load_seconds
        elif lab.get("load_seconds") is not None:
            self.load_seconds = float(lab["load_seconds"])
        else:
            self.load_seconds = self.load_bytes / (settings.disk_mb_per_second * 1e6)
        self.tokens_per_second = settings.tokens_per_second or float(lab.get("tokens_per_second", 30.0))
        # Prompt rate: HERD_EMU_PROMPT_TOKENS_PER_SECOND, else the model's, else K / parameter_count.
        self.prompt_tokens_per_second = (settings.prompt_tokens_per_second
                                         or float(lab.get("prompt_tokens_per_second") or 0)
                                         or prompt_rate_for(self.parameter_count))
        # HERD_EMU_BUSY_SLOWDOWN set: the old linear rule (None: the batch curve). herd_lab's own busy_slowdown
        # (mkmodels still writes it) is not read any more: the measured curve replaced it.
        self.busy_slowdown = settings.busy_slowdown
        self.batch_step_ratios = parse_step_ratios(lab.get("batch_step_ratios"))
        self.context_length = int(lab.get("context_length", 4096))
        # KV cache per 1024 tokens per slot (f16). A model without it is counted like an 8B model.
        self.kv_mib_per_1k_ctx = float(lab.get("kv_mib_per_1k_ctx", 128))

    @property
    def key(self):
        return self.manifest_path

    def details(self):
        family = self.config.get("model_family", "")
        return {
            "parent_model": "",
            "format": self.config.get("model_format", "gguf"),
            "family": family,
            "families": self.config.get("model_families") or ([family] if family else None),
            "parameter_size": self.config.get("model_type", ""),
            "quantization_level": self.config.get("file_type", ""),
        }


class ModelStore:
    def __init__(self, settings):
        self.settings = settings
        self.root = settings.models_dir

    def manifest_path(self, parsed):
        return os.path.join(self.root, "manifests", *parsed)

    def blob_path(self, digest):
        return os.path.join(self.root, "blobs", digest.replace(":", "-"))

    def write_manifest(self, parsed, data):
        """Write a manifest under a name, whole or not at all (a temporary file renamed into place)."""
        path = self.manifest_path(parsed)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as handle:
            handle.write(data)
        os.replace(path + ".tmp", path)

    def resolve(self, name):
        """ModelInfo for a name, or None when the store does not hold it."""
        parsed = parse_model_name(name)
        if parsed is None:
            return None
        path = self.manifest_path(parsed)
        try:
            with open(path, "rb") as handle:
                manifest_bytes = handle.read()
            manifest = json.loads(manifest_bytes)
            with open(self.blob_path(manifest["config"]["digest"]), "rb") as handle:
                config = json.load(handle)
        except (OSError, ValueError, KeyError):
            return None
        return ModelInfo(display_name(parsed), path, manifest_bytes, config, self.settings)

    def list(self):
        base = os.path.join(self.root, "manifests")
        found = []
        for dirpath, _dirs, files in os.walk(base):
            for tag in files:
                rel = os.path.relpath(os.path.join(dirpath, tag), base).split(os.sep)
                if len(rel) != 4:
                    continue
                info = self.resolve(display_name(tuple(rel)))
                if info is not None:
                    found.append(info)
        return sorted(found, key=lambda info: info.modified, reverse=True)

    def referenced_digests(self):
        refs = set()
        for info in self.list():
            refs.add(info.manifest["config"]["digest"])
            refs.update(layer["digest"] for layer in info.manifest.get("layers", []))
        return refs

    def delete(self, name):
        info = self.resolve(name)
        if info is None:
            return False
        os.remove(info.manifest_path)
        # Ollama prunes the manifest folders left empty (PruneDirectory on manifests/).
        folder, top = os.path.dirname(info.manifest_path), os.path.join(self.root, "manifests")
        while folder != top and folder.startswith(top + os.sep):
            try:
                os.rmdir(folder)
            except OSError:
                break
            folder = os.path.dirname(folder)
        keep = self.referenced_digests()
        for digest in [info.manifest["config"]["digest"]] + [layer["digest"] for layer in info.manifest["layers"]]:
            if digest not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.blob_path(digest))
        return True


# --------------------------------------------------------------------------- scheduler


def default_context(gpus):
    """Ollama >= 0.15.5 without OLLAMA_CONTEXT_LENGTH: the context follows the visible GPUs' memory."""
    total_mib = sum(int(g["memory_total_mib"]) for g in gpus)
    if total_mib < 24 * 1024:
        return 4096
    if total_mib < 48 * 1024:
        return 32768
    return 262144


def context_for(model, settings, gpus):
    """The context a runner gets: OLLAMA_CONTEXT_LENGTH or the GPU-memory default, capped at the trained one."""
    wanted = settings.context_length or default_context(gpus)
    return min(wanted, model.context_length) if model.context_length else wanted


def need_mib(model, settings, gpus):
    """GPU memory a loaded model takes: weights + KV cache of num_parallel full contexts (as Ollama sizes it)."""
    kv = settings.num_parallel * context_for(model, settings, gpus) / 1024 * model.kv_mib_per_1k_ctx
    return int(model.vram_mib + kv)


class Runner:
    """A loaded (or loading) model with NUM_PARALLEL slots, like server/sched.go's runnerRef."""

    def __init__(self, model, settings, gpus, session):
        self.model = model
        self.gpus = gpus
        self.num_parallel = settings.num_parallel
        self.slots = asyncio.Semaphore(self.num_parallel)
        # The prompt cache of each slot: the tokens it processed last, and when (runner/llamarunner/cache.go).
        self.prompt_cache = settings.prompt_cache
        self.multiuser_cache = settings.multiuser_cache
        self.cache_tokens = [[] for _ in range(self.num_parallel)]
        # Ollama 0.30+ (llama-server): slots picked by prompt similarity, and the host-memory prompt cache: prompts
        # saved from slots that are given another one, oldest first, and the KV bytes per token they take.
        self.runner = settings.runner
        self.ram_cache = []
        self.ram_limit = settings.cache_ram_mib * MIB if settings.cache_ram_mib > 0 else settings.cache_ram_mib
        self.cache_idle_slots = settings.cache_idle_slots
        self.kv_bytes_per_token = model.kv_mib_per_1k_ctx * MIB / 1024
        self.host_copy_rate = settings.host_copy_mb_per_second * 1e6
        self.copied_tokens = 0  # tokens the last pick copied to and from the host cache
        self.cache_used = [0.0] * self.num_parallel
        self.slot_busy = [False] * self.num_parallel
        self.active = 0
        self.peak_active = 0
        self.ref_count = 1
        self.loading = True
        self.ready = asyncio.Event()
        self.gone = asyncio.Event()
        self.load_error = None
        self.session = session
        self.expire_handle = None
        self.expires_at = time.time() + (session if session != FOREVER else 0)
        self.expires_in = session
        self.last_used = time.monotonic()
        self.context_length = context_for(model, settings, gpus)
        self.size = need_mib(model, settings, gpus) * MIB
        self.size_vram = self.size if gpus else 0
        self.rate_factor = 1.0 if gpus else settings.cpu_factor
        # The timing model's state: slots generating now (B), slots evaluating a prompt, the lane prompt chunks
        # take one at a time, and the loop time the chunk in progress ends.
        self.generating = 0
        self.prefilling = 0
        self.prefill_lane = asyncio.Lock()
        self.chunk_end = 0.0

    def token_rate(self):
        """Per-slot tokens/s now: tokens_per_second / T(B) for B slots generating (the batch curve), or with
        HERD_EMU_BUSY_SLOWDOWN the old rule: full speed alone, busy_slowdown x when every slot is taken."""
        rate = self.model.tokens_per_second * self.rate_factor
        if self.model.busy_slowdown is not None:
            if self.num_parallel > 1 and self.active > 1:
                busy = (self.active - 1) / (self.num_parallel - 1)
                rate *= 1.0 - (1.0 - self.model.busy_slowdown) * busy
            return rate
        return rate / step_ratio(self.model.batch_step_ratios, max(1, self.generating))

    async def prefill(self, tokens, copy_seconds=0.0):
        """Evaluate `tokens` uncached prompt tokens in chunks of PREFILL_CHUNK at the model's prompt rate. Chunks
        go through the runner's lane one at a time, in turn (FIFO), so P prefills at once each take about P times
        as long; while a chunk runs, generating slots' next tokens wait for it (see Server._run_tokens).
        `copy_seconds` holds the lane first: llama-server's copies between the slot and its host-memory prompt
        cache, which its one loop does before the slot's prompt."""
        loop = asyncio.get_running_loop()
        if copy_seconds > 0:
            async with self.prefill_lane:
                self.chunk_end = loop.time() + copy_seconds
                await asyncio.sleep(copy_seconds)
        if tokens <= 0:
            return
        rate = self.model.prompt_tokens_per_second
        self.prefilling += 1
        try:
            while tokens > 0:
                chunk = min(tokens, PREFILL_CHUNK)
                async with self.prefill_lane:
                    now = loop.time()
                    # back to back with the chunk before (within 10 ms): start at its end, so that timer lateness
                    # does not add up over a long prompt
                    start = self.chunk_end if 0 <= now - self.chunk_end < 0.01 else now
                    self.chunk_end = start + chunk / rate
                    await asyncio.sleep(max(0.0, self.chunk_end - loop.time()))
                tokens -= chunk
        finally:
            self.prefilling -= 1

    def pick_slot(self, tokens):
        """The free slot for a prompt and the tokens it has cached: like the runner's findLongestCacheSlot, the
        free slot whose last prompt shares the longest prefix with this one; with no shared prefix anywhere,
        the least recently used free slot. With OLLAMA_MULTIUSER_CACHE, like findBestCacheSlot: the slot whose
        whole cache begins the prompt when it is free; else the least recently used free slot, with the longest
        prefix of any slot, busy ones included, copied into it ("forking cache slot"). Returns (index, cached
        tokens)."""
        if getattr(self, "runner", "llamarunner") == "llama-server":
            return self._pick_server_slot(tokens)
        if getattr(self, "multiuser_cache", False):
            return self._pick_best_slot(tokens)
        best, best_len = None, -1
        for index in range(self.num_parallel):
            if self.slot_busy[index]:
                continue
            length = common_prefix(self.cache_tokens[index], tokens) if self.prompt_cache else 0
            if length > best_len or (length == best_len and self.cache_used[index] < self.cache_used[best]):
                best, best_len = index, length
        # Like the runner: a prompt wholly in the cache still evaluates its last token (to get logits).
        return best, min(best_len, max(0, prompt_len(tokens) - 1))

    def _pick_best_slot(self, tokens):
        longest, longest_slot, oldest = -1, None, None
        for index in range(self.num_parallel):
            length = common_prefix(self.cache_tokens[index], tokens) if self.prompt_cache else 0
            if length > longest:
                longest, longest_slot = length, index
            if not self.slot_busy[index] and (oldest is None or self.cache_used[index] < self.cache_used[oldest]):
                oldest = index
        cap = max(0, prompt_len(tokens) - 1)
        if (not self.slot_busy[longest_slot]
                and longest == prompt_len(self.cache_tokens[longest_slot])):
            return longest_slot, min(longest, cap)
        return oldest, min(max(longest, 0), cap)

    def _pick_server_slot(self, tokens):
        """llama-server's get_available_slot (tools/server/server-context.cpp): the free slot whose prompt shares
        the largest fraction of this one (more than SLOT_PROMPT_SIMILARITY), else the least recently used free
        slot. When the slot was taken by age, or keeps less than half of what it holds, its prompt is saved in the
        host-memory cache and the cached prompt that begins this one best is moved into the slot (see
        _ram_save, _ram_load). Then, with --cache-idle-slots, every other idle slot's prompt is saved there too.
        Embeddings (no tokens) take a slot without touching the cache, but save the idle slots."""
        n = prompt_len(tokens)
        best, best_sim, update = None, 0.0, False
        if self.prompt_cache and n:
            for index in range(self.num_parallel):
                if self.slot_busy[index] or not self.cache_tokens[index]:
                    continue
                sim = common_prefix(self.cache_tokens[index], tokens) / n
                if sim > best_sim and sim > SLOT_PROMPT_SIMILARITY:
                    best, best_sim = index, sim
            if best is not None and best_sim * n / max(1, prompt_len(self.cache_tokens[best])) < 0.5:
                update = True
        if best is None:
            for index in range(self.num_parallel):
                # ties go to the later slot, as `slot.t_last_used <= t_last` does
                if not self.slot_busy[index] and (best is None or self.cache_used[index] <= self.cache_used[best]):
                    best = index
            update = True
        # what the host-memory cache copies for this pick: the slot's prompt out, a cached one in (KV state)
        self.copied_tokens = 0
        if self.prompt_cache and n and update and self.ram_limit != 0:
            held = self.cache_tokens[best]
            if self._ram_save(held):
                self.copied_tokens += prompt_len(held)
            self._ram_load(best, tokens)
            if self.cache_tokens[best] is not held:
                self.copied_tokens += prompt_len(self.cache_tokens[best])
            self._ram_update()
        if self.prompt_cache and self.cache_idle_slots and self.ram_limit != 0:
            # --cache-idle-slots (on by default): once the request has its slot, llama-server saves the prompt of
            # every other idle slot in the host-memory cache (process_single_task: prompt_save, then update, per
            # slot). Without a unified KV cache (Ollama passes -np, so llama-server does not unify it) the slot
            # keeps its prompt too: the cache holds a copy, so a prompt that the next request takes over without
            # a save of its own (it keeps half or more) is still there.
            for index in range(self.num_parallel):
                held = self.cache_tokens[index]
                if index != best and not self.slot_busy[index] and held and self._ram_save(held):
                    self.copied_tokens += prompt_len(held)
                    self._ram_update()
        cached = common_prefix(self.cache_tokens[best], tokens) if self.prompt_cache else 0
        return best, min(cached, max(0, n - 1))

    def _ram_save(self, held):
        """server_prompt_cache::alloc: nothing when a cached prompt already holds all of `held`; cached prompts
        that `held` holds whole are dropped; `held` goes in last (the newest). Returns whether it was saved."""
        if not held:
            return False
        size = prompt_len(held)
        if any(common_prefix(entry, held) == size for entry in self.ram_cache):
            return False
        self.ram_cache = [e for e in self.ram_cache if common_prefix(e, held) != prompt_len(e)]
        self.ram_cache.append(list(held))
        return True

    def _ram_load(self, index, tokens):
        """server_prompt_cache::load: the cached prompt that keeps a larger fraction of itself (at least a quarter)
        and covers a larger fraction of the new prompt than the slot's own is moved out of the cache into it."""
        held = self.cache_tokens[index]
        n = prompt_len(tokens)
        lcp = common_prefix(held, tokens)
        keep_best = lcp / prompt_len(held) if held else -1.0
        sim_best = lcp / n
        found = None
        for i, entry in enumerate(self.ram_cache):
            lcp = common_prefix(entry, tokens)
            keep = lcp / max(1, prompt_len(entry))
            if keep < 0.25:
                continue
            if keep_best < keep and sim_best < lcp / n:
                keep_best, sim_best, found = keep, lcp / n, i
        if found is not None:
            self.cache_tokens[index] = self.ram_cache.pop(found)

    def _ram_update(self):
        """server_prompt_cache::update: the oldest prompts leave while the cache is over --cache-ram (KV bytes of
        its tokens), always keeping one."""
        if self.ram_limit < 0:
            return
        while len(self.ram_cache) > 1 and (sum(prompt_len(e) for e in self.ram_cache) * self.kv_bytes_per_token
                                           > self.ram_limit):
            self.ram_cache.pop(0)

    @contextlib.asynccontextmanager
    async def slot(self, tokens=()):
        """Take a slot for a prompt of `tokens`; yields a SlotUse (index, cached = prompt tokens found in the
        slot's cache). The caller may set .keep to the tokens the slot holds afterwards (default: the prompt)."""
        # DIFFERS: Ollama waits for a slot on the runner's semaphore (llm/server.go) the same way:
        # unbounded, outside OLLAMA_MAX_QUEUE. Only the scheduler's pending queue is bounded.
        async with self.slots:
            index, cached = self.pick_slot(list(tokens))
            self.slot_busy[index] = True
            use = SlotUse(index, cached, list(tokens))
            if self.copied_tokens:  # only llama-server's pick copies
                use.copy_seconds = self.copied_tokens * self.kv_bytes_per_token / self.host_copy_rate
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            try:
                yield use
            finally:
                self.active -= 1
                self.last_used = time.monotonic()
                self.slot_busy[index] = False
                self.cache_used[index] = self.last_used
                if self.prompt_cache:
                    self.cache_tokens[index] = use.keep


class SlotUse:
    def __init__(self, index, cached, tokens):
        self.index = index
        self.cached = cached
        self.keep = tokens
        self.copy_seconds = 0.0  # llama-server's copies to and from its host-memory cache for this pick


class Scheduler:
    """Follows server/sched.go: one pending queue of OLLAMA_MAX_QUEUE, processed one request at a
    time; a request for a model that is loading blocks the queue until the load ends; eviction
    (OLLAMA_MAX_LOADED_MODELS or VRAM) waits for the victim to go idle, blocking the queue too."""

    def __init__(self, settings, gpus):
        self.settings = settings
        self.gpus = gpus
        self.pending = asyncio.Queue()  # bounded by hand in get_runner
        self.busy = False
        self.loaded = {}
        self.task = None
        self.vram_total_mib = sum(int(g["memory_total_mib"]) - int(g.get("memory_used_mib") or 0) for g in gpus)

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self.process_pending())

    def get_runner(self, model, keep_alive):
        """Queue a request; returns a future for its Runner. Raises ModelError(503) when the queue is full."""
        fut = asyncio.get_running_loop().create_future()
        runner = self.loaded.get(model.key)
        if not self.busy and self.pending.empty() and runner is not None and not runner.loading:
            # Ollama's scheduler goroutine takes a request for a loaded model at once; asyncio would only
            # get to it on the next loop turn, so hand the runner over here (same result, no queue slot).
            self._use_loaded(runner, keep_alive, fut)
            return fut
        # pendingReqCh holds OLLAMA_MAX_QUEUE requests; an idle scheduler takes one more off it at once.
        if self.pending.qsize() >= self.settings.max_queue + (0 if self.busy else 1):
            raise ModelError(503, ERR_MAX_QUEUE)
        self.pending.put_nowait((model, keep_alive, fut))
        return fut

    def _use_loaded(self, runner, keep_alive, fut):
        """useLoadedRunner: take a reference, stop the expiry timer, apply the request's keep_alive."""
        runner.ref_count += 1
        self._cancel_expiry(runner)
        if keep_alive is not None:
            runner.session = keep_alive
        fut.set_result(runner)

    async def process_pending(self):
        while True:
            model, keep_alive, fut = await self.pending.get()
            if fut.done():  # the client went away while queued
                continue
            self.busy = True
            try:
                await self.schedule(model, keep_alive, fut)
            except ModelError as exc:
                if not fut.done():
                    fut.set_exception(exc)
            except Exception as exc:  # keep the scheduler alive whatever happens
                log("ERROR", "scheduler error", error=repr(exc))
                if not fut.done():
                    fut.set_exception(ModelError(500, str(exc)))
            finally:
                self.busy = False

    def max_loaded(self):
        if self.settings.max_loaded > 0:
            return self.settings.max_loaded
        return 3 * len(self.gpus) if self.gpus else 1

    async def schedule(self, model, keep_alive, fut):
        while True:
            runner = self.loaded.get(model.key)
            if runner is not None:
                if runner.loading:
                    await runner.ready.wait()
                if runner.gone.is_set() or runner.load_error:
                    continue
                if not fut.done():
                    self._use_loaded(runner, keep_alive, fut)
                return
            if len(self.loaded) >= self.max_loaded():
                log("DEBUG", "max runners achieved, unloading one to make room", runner_count=len(self.loaded))
                await self.expire_and_wait(self.pick_victim())
                continue
            if self.gpus:
                need = need_mib(model, self.settings, self.gpus)
                if need > self.vram_total_mib:
                    # DIFFERS: Ollama would offload part of the model to CPU and fail only when system
                    # RAM is short too; the lab models a GPU-only host and refuses with Ollama's message.
                    raise ModelError(500, f"model requires more system memory ({human_gib(need * MIB)}) than is available ({human_gib(self.vram_total_mib * MIB)})")
                used = sum(r.size // MIB for r in self.loaded.values())
                if self.loaded and need > self.vram_total_mib - used:
                    await self.expire_and_wait(self.pick_victim())
                    continue
            if fut.done():
                return
            self.load(model, keep_alive, fut)
            return

    def load(self, model, keep_alive, fut):
        session = self.settings.keep_alive if keep_alive is None else keep_alive
        runner = Runner(model, self.settings, self.gpus, session)
        runner.load_started = time.monotonic()
        self.loaded[model.key] = runner
        log("INFO", "loading model (simulated)", model=model.name, vram_mib=runner.size // MIB,
            context_length=runner.context_length,
            gpus=",".join(g["uuid"] for g in self.gpus) or "cpu", seconds=model.load_seconds)
        asyncio.get_running_loop().create_task(self._finish_load(runner, fut))

    async def _finish_load(self, runner, fut):
        await asyncio.sleep(runner.model.load_seconds)
        runner.loading = False
        runner.load_duration = time.monotonic() - runner.load_started
        runner.ready.set()
        runner.expires_at = time.time() + (runner.session if runner.session != FOREVER else 0)
        log("INFO", "model loaded (simulated)", model=runner.model.name)
        if fut.done():
            self.finished(runner)
        else:
            fut.set_result(runner)

    def pick_victim(self):
        """findRunnerToUnload: an idle runner first, else the least recently used."""
        runners = sorted(self.loaded.values(), key=lambda r: (r.ref_count > 0, r.last_used))
        return runners[0]

    async def expire_and_wait(self, runner):
        runner.session = 0
        self._cancel_expiry(runner)
        if runner.loading:
            await runner.ready.wait()
        if runner.ref_count <= 0:
            self.unload(runner)
        await runner.gone.wait()

    def expire(self, model):
        """expireRunner: unload as soon as idle (keep_alive 0 with an empty prompt)."""
        runner = self.loaded.get(model.key)
        if runner is None:
            return
        runner.session = 0
        self._cancel_expiry(runner)
        if runner.ref_count <= 0 and not runner.loading:
            self.unload(runner)

    def finished(self, runner):
        """A request let go of the runner (its context ended)."""
        runner.ref_count -= 1
        runner.last_used = time.monotonic()
        if runner.ref_count > 0 or runner.gone.is_set():
            return
        if runner.session <= 0:
            self.unload(runner)
            return
        self._cancel_expiry(runner)
        if runner.session != FOREVER:
            runner.expire_handle = asyncio.get_running_loop().call_later(runner.session, self._expired, runner)
            runner.expires_at = time.time() + runner.session
        else:
            runner.expires_at = time.time() + (2**63 - 1) / 1e9

    def _expired(self, runner):
        runner.expire_handle = None
        if runner.ref_count <= 0:
            self.unload(runner)

    def _cancel_expiry(self, runner):
        if runner.expire_handle is not None:
            runner.expire_handle.cancel()
            runner.expire_handle = None

    def unload(self, runner):
        self._cancel_expiry(runner)
        if self.loaded.get(runner.model.key) is runner:
            del self.loaded[runner.model.key]
        if not runner.gone.is_set():
            runner.gone.set()
            log("INFO", "model unloaded (simulated)", model=runner.model.name)

    def ps(self):
        models = []
        for runner in self.loaded.values():
            if runner.session == FOREVER:
                expires = go_time_far(FOREVER)
            elif runner.ref_count > 0 or runner.loading:
                expires = go_time_far(runner.session)
            else:
                expires = go_time_far(max(0.0, runner.expires_at - time.time()))
            models.append({
                "name": runner.model.name,
                "model": runner.model.name,
                "size": runner.size,
                "digest": runner.model.digest,
                "details": runner.model.details(),
                "expires_at": expires,
                "size_vram": runner.size_vram,
                "context_length": runner.context_length,
            })
        return models


# --------------------------------------------------------------------------- HTTP plumbing


class Request:
    def __init__(self, method, target, version, headers, body):
        self.method = method
        parts = urllib.parse.urlsplit(target)
        self.path = parts.path
        self.query = parts.query
        self.version = version
        self.headers = headers
        self.body = body

    @property
    def keep_alive(self):
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


class BadRequest(Exception):
    pass


class Connection:
    """One client connection: HTTP/1.1 with keep-alive; chunked responses for streams."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.eof = False

    async def _fill(self):
        data = await self.reader.read(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def read_request(self):
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > 65536:
                raise BadRequest("header too large")
            if self.eof or not await self._fill():
                return None
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        lines = head.split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            raise BadRequest("bad request line") from None
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        body = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked()
        elif headers.get("content-length"):
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise BadRequest("bad content-length") from None
            if length > 64 * MIB:
                raise BadRequest("body too large")
            while len(self.buf) < length:
                if not await self._fill():
                    return None
            body = bytes(self.buf[:length])
            del self.buf[:length]
        return Request(method, target, version, headers, body)

    async def _read_chunked(self):
        body = bytearray()
        while True:
            while b"\r\n" not in self.buf:
                if not await self._fill():
                    raise BadRequest("truncated chunk")
            line, _, _rest = bytes(self.buf).partition(b"\r\n")
            del self.buf[: len(line) + 2]
            size = int(line.split(b";")[0], 16)
            while len(self.buf) < size + 2:
                if not await self._fill():
                    raise BadRequest("truncated chunk")
            body += self.buf[:size]
            del self.buf[: size + 2]
            if size == 0:
                return bytes(body)

    async def watch_disconnect(self, task):
        """While a request is handled, a client that closes its side cancels the handler."""
        try:
            while await self._fill():
                pass
        except (ConnectionError, OSError):
            pass
        task.cancel()


_date_cache = [0, ""]


def http_date():
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = email.utils.formatdate(now, usegmt=True)
    return _date_cache[1]


class Response:
    def __init__(self, writer, request):
        self.writer = writer
        self.head_only = request.method == "HEAD"
        self.keep_alive = request.keep_alive
        self.status = 0
        self.streaming = False
        self.started = False

    def _head(self, status, headers):
        self.status = status
        phrase = http.HTTPStatus(status).phrase if status != 499 else "Client Closed Request"
        lines = [f"HTTP/1.1 {status} {phrase}"]
        lines += ["{}: {}".format(*item) for item in headers]
        lines.append("Date: " + http_date())
        if not self.keep_alive:
            lines.append("Connection: close")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.started = True

    def send(self, status, body, content_type="application/json; charset=utf-8"):
        if isinstance(body, str):
            body = body.encode()
        self._head(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        if not self.head_only:
            self.writer.write(body)

    def json(self, status, obj):
        self.send(status, json.dumps(obj, separators=(",", ":")))

    def error(self, status, message):
        self.json(status, {"error": message})

    def start_stream(self, content_type, status=200):
        self._head(status, [("Content-Type", content_type), ("Transfer-Encoding", "chunked")])
        self.streaming = True

    def chunk(self, data):
        if isinstance(data, str):
            data = data.encode()
        if data:
            self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_stream(self):
        self.writer.write(b"0\r\n\r\n")

    async def drain(self):
        if self.writer.transport.is_closing():
            raise ConnectionResetError("client closed")
        await self.writer.drain()


# --------------------------------------------------------------------------- the server


def _ns(seconds):
    return int(seconds * 1e9)


def _timings(started, load_duration, evaluated, prompt_s, n_tokens, eval_s):
    """The duration and count fields that close an Ollama generate or chat answer."""
    return {"total_duration": _ns(time.monotonic() - started), "load_duration": _ns(load_duration),
            "prompt_eval_count": evaluated, "prompt_eval_duration": _ns(prompt_s),
            "eval_count": n_tokens, "eval_duration": _ns(eval_s)}


def _send_final(resp, stream, final):
    """The closing object of a generate or chat answer: the last NDJSON line, or the whole JSON answer."""
    if stream:
        resp.chunk(json.dumps(final, separators=(",", ":")) + "\n")
    else:
        resp.json(200, final)


def estimate_tokens(text):
    return max(1, (len(text) + 3) // 4)


# Emulated tokens: 4 bytes of text each (as estimate_tokens counts them), so that two prompts that share a
# text prefix share a token prefix, and fixed template markers of 4 tokens around the parts. A prompt is a list
# of segments, (MARK, name) = 4 tokens or (TEXT, text) = estimate_tokens(text) tokens, so that a prompt of a
# megabyte is a few objects, compared at C speed.
MARK, TEXT = 0, 1


def segment_tokens(segment):
    return 4 if segment[0] == MARK else estimate_tokens(segment[1])


def prompt_len(segments):
    return sum(segment_tokens(s) for s in segments)


def generate_tokens(system, prompt):
    """A /api/generate prompt: 4 template tokens, the text (system + prompt), 4 more (estimate_tokens + 8)."""
    return [(MARK, "start"), (TEXT, system + prompt), (MARK, "end")]


def message_tokens(message):
    """One chat message: 4 header tokens naming the role, then its content and the tool calls it carries (as the
    template renders them: name and arguments), so that a turn resent with its tool calls matches the cache."""
    text = str(message.get("content") or "")
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        text += "".join(tool_call_text(call) for call in calls)
    return [(MARK, str(message.get("role") or "")), (TEXT, text)]


def chat_tokens(messages, tools=None):
    """A chat prompt: the tools offered (as the template renders them first), every message, then 4 tokens that
    open the assistant's answer (as the chat template)."""
    out = [(MARK, "tools"), (TEXT, compact_json(tools))] if tools else []
    for m in messages:
        if isinstance(m, dict):
            out += message_tokens(m)
    return out + [(MARK, "answer")]


def compact_json(obj):
    """JSON as Go's encoder writes it: no spaces."""
    return json.dumps(obj, separators=(",", ":"))


# --------------------------------------------------------------------------- tools, capabilities, embeddings

# The emulator's stand-in for a model that decides to call a tool: see tool_call_for.
TOOL_TRIGGER = "use tool"
_PLACEHOLDERS = {"string": "herd", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}


def tool_call_text(call):
    """A tool call as the prompt holds it: its name and its arguments (a dict, or the JSON text OpenAI sends)."""
    function = (call.get("function") or {}) if isinstance(call, dict) else {}
    args = function.get("arguments")
    if isinstance(args, str):
        with contextlib.suppress(ValueError):
            args = json.loads(args)
    return "<tool_call>{}{}".format(function.get("name") or "", json.dumps(args or {}, sort_keys=True))


def placeholder_arguments(parameters):
    """Arguments for a tool's JSON schema: each required property gets a placeholder of its type ("herd", 1,
    true, [], {})."""
    parameters = parameters if isinstance(parameters, dict) else {}
    properties = parameters.get("properties") if isinstance(parameters.get("properties"), dict) else {}
    args = {}
    for name in parameters.get("required") or []:
        kind = (properties.get(name) or {}).get("type") if isinstance(properties.get(name), dict) else None
        args[str(name)] = _PLACEHOLDERS.get(kind[0] if isinstance(kind, list) and kind else kind, "herd")
    return args


def tool_call_for(messages, tools):
    """The tool call the emulated model answers with, or None for a text answer.

    DIFFERS: a model decides from the text. The emulator calls a tool when the request offers tools (Ollama's
    api.Tool shape, {"function": {"name", "parameters"}}) and the last message is the user's and contains
    TOOL_TRIGGER ("use tool", any case): it calls the first tool, with placeholder arguments. A tool result
    (role "tool") or any other turn gets a text answer, so a multi-turn agent conversation ends.
    """
    last = next((m for m in reversed(messages) if isinstance(m, dict)), None)
    if not tools or last is None or last.get("role") != "user":
        return None
    if TOOL_TRIGGER not in str(last.get("content") or "").lower():
        return None
    function = (tools[0].get("function") or {}) if isinstance(tools[0], dict) else {}
    return {"id": "call_" + os.urandom(4).hex(),
            "function": {"index": 0, "name": str(function.get("name") or ""),
                         "arguments": placeholder_arguments(function.get("parameters"))}}


def model_capabilities(model_info, template):
    """/api/show capabilities as current Ollama derives them (server/images.go): from the GGUF, "embedding" when it
    has <arch>.pooling_type, else "completion", and "vision" with <arch>.vision.block_count; from the Go template,
    "tools" when it uses .Tools and "insert" when it uses .Suffix."""
    arch = str(model_info.get("general.architecture") or "")
    caps = ["embedding" if f"{arch}.pooling_type" in model_info else "completion"]
    if f"{arch}.vision.block_count" in model_info:
        caps.append("vision")
    if re.search(r"\.Tools\b", template):
        caps.append("tools")
    if re.search(r"\.Suffix\b", template):
        caps.append("insert")
    return caps


# The vector length of a model whose GGUF has no <arch>.embedding_length (nomic-embed-text's).
DEFAULT_EMBEDDING_LENGTH = 768


def embedding_vector(model, text, dims):
    """A made-up embedding: `dims` values in [-1, 1] from sha256(model + NUL + text) and its chained hashes, so the
    same model and text give the same vector; L2-normalised as Ollama's /api/embed returns them."""
    values = []
    block = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    while len(values) < dims:
        values += [v / 2147483648.0 for v in struct.unpack("<8i", block)]
        block = hashlib.sha256(block).digest()
    return normalize(values[:dims])


def normalize(vector):
    """Scale to length 1 as Ollama's normalize() (a zero vector stays zero); values rounded to float32 precision."""
    norm = 1.0 / max(math.sqrt(sum(v * v for v in vector)), 1e-12)
    return [round(v * norm, 8) for v in vector]


def chat_kept_tokens(prompt, answer):
    """What a slot holds after a chat turn: the prompt up to the answer's opening, then the answer (its text, or the
    assistant message with its tool calls) as the next turn's history renders it, so that the next turn finds it
    cached."""
    message = answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}
    return prompt[:-1] + message_tokens(message)


def _silent(_index, _text):
    """An emit() that writes nothing (a tool call's or an embedding's tokens)."""


def _common_chars(a, b):
    """Length of the common prefix of two strings (binary search over slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_prefix(a, b):
    """Tokens two prompts (segment lists) share from their start."""
    total = 0
    for x, y in zip(a, b, strict=False):
        if x == y:
            total += segment_tokens(x)
            continue
        if x[0] == TEXT and y[0] == TEXT:
            total += _common_chars(x[1], y[1]) // 4
        break
    return total


# --------------------------------------------------------------------------- requests in each API's dialect


def go_kind(value):
    """The JSON kind Go's decoder names in a type error ("array", "object", ...)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "null")


def _rand_id(limit):
    """A random number below limit, as Ollama's middleware numbers its answers (rand.Intn)."""
    return int.from_bytes(os.urandom(4), "big") % limit


def _function_tool(name, description, parameters):
    """A tool in Ollama's own shape (api.Tool), whatever API offered it."""
    return {"type": "function", "function": {"name": str(name or ""), "description": str(description or ""),
                                             "parameters": parameters if isinstance(parameters, dict) else {}}}


def _tool_call(call_id, name, arguments):
    """A tool call in Ollama's own shape (api.ToolCall)."""
    return {"id": call_id, "function": {"index": 0, "name": name, "arguments": arguments}}


def openai_messages(messages):
    """OpenAI chat messages as Ollama's (openai.FromChatRequest): each text part of a list becomes a message of its
    own, tool calls' JSON arguments are decoded, content may be missing only beside tool calls. ValueError says why
    a message is refused, in Ollama's words."""
    out = []
    for msg in messages:
        if not isinstance(msg, dict):
            raise ValueError("invalid message format")
        role, content, calls = str(msg.get("role") or ""), msg.get("content"), []
        for raw in msg.get("tool_calls") or []:
            raw = raw if isinstance(raw, dict) else {}
            function = raw.get("function") if isinstance(raw.get("function"), dict) else {}
            try:
                args = json.loads(function.get("arguments") or "")
            except (TypeError, ValueError):
                raise ValueError("invalid tool call arguments") from None
            calls.append(_tool_call(raw.get("id") or "", str(function.get("name") or ""), args))
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in ("text", "image_url", "input_audio"):
                    raise ValueError("invalid message format")
                out.append({"role": role, "content": str(part.get("text") or "")})
        elif not calls:
            raise ValueError("invalid message content type: " + {"null": "<nil>", "number": "float64", "bool": "bool",
                                                                  "object": "map[string]interface {}"}[go_kind(content)])
        else:
            out.append({"role": role, "content": ""})
        if calls and out:
            out[-1]["tool_calls"] = calls
    return out


def _responses_content(content):
    """The text of a Responses message's content (a string, or input_text/output_text parts; images are skipped)."""
    if isinstance(content, str):
        return content
    text = ""
    for part in content if isinstance(content, list) else []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_file":
            raise ValueError("file inputs are not currently supported")
        if kind in ("input_text", "output_text"):
            text += str(part.get("text") or "")
    return text


def _responses_tools(tools, prefix=""):
    """Responses tools ({type, name, parameters}; a namespace's members named "namespace.member") as Ollama's."""
    out = []
    for tool in tools if isinstance(tools, list) else []:
        if not isinstance(tool, dict):
            continue
        name = prefix + str(tool.get("name") or "")
        if tool.get("type") == "namespace":
            out += _responses_tools(tool.get("tools"), name + "." if tool.get("name") else prefix)
        else:
            out.append(_function_tool(name, tool.get("description"), tool.get("parameters")))
    return out


def responses_request(data):
    """(messages, tools) of an OpenAI Responses request as Ollama's (openai.FromResponsesRequest): instructions
    become a system message, a string input a user message; items are messages (`role` alone is enough),
    function_call (merged into the assistant message before it), function_call_output (a tool message) and
    reasoning (skipped)."""
    messages = [{"role": "system", "content": data["instructions"]}] if data.get("instructions") else []
    items = data.get("input")
    if isinstance(items, str):
        messages += [{"role": "user", "content": items}] if items else []
        items = []
    elif items is not None and not isinstance(items, list):
        raise ValueError(f"input must be a string or array: json: cannot unmarshal {go_kind(items)} into Go value "
                         "of type []json.RawMessage")
    for index, item in enumerate(items or []):
        item = item if isinstance(item, dict) else {}
        kind = item.get("type") or ("message" if item.get("role") else "")
        if kind == "message":
            messages.append({"role": str(item.get("role") or ""), "content": _responses_content(item.get("content"))})
        elif kind == "function_call":
            try:
                args = json.loads(item.get("arguments") or "{}")
            except ValueError as exc:
                raise ValueError(f"failed to parse function call arguments: {exc}") from None
            call = _tool_call(item.get("call_id") or "", str(item.get("name") or ""), args)
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "content": _responses_content(output), "tool_call_id": item.get("call_id")})
        elif kind not in ("reasoning", "web_search_call"):
            problem = f"unknown input item type: {json.dumps(kind)}" if kind else "input item missing required 'type' field"
            raise ValueError(f"input[{index}]: {problem}")
    return messages, _responses_tools(data.get("tools"))


def _anthropic_text(content):
    """The text of an Anthropic tool_result's or system's content: a string, or its text blocks joined."""
    if isinstance(content, str):
        return content
    return "".join(str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text") \
        if isinstance(content, list) else ""


def anthropic_message(msg):
    """One Anthropic message as Ollama's (anthropic.convertMessage): text blocks joined, tool_use blocks as tool
    calls, each tool_result block a tool message (before the user's text, after anyone else's)."""
    msg = msg if isinstance(msg, dict) else {}
    role, content = str(msg.get("role") or "").lower(), msg.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
    text, calls, results = "", [], []
    for block in blocks if isinstance(blocks, list) else []:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text += str(block.get("text") or "")
        elif kind in ("tool_use", "server_tool_use"):
            for field in ("id", "name"):
                if kind == "tool_use" and not block.get(field):
                    raise ValueError(f"tool_use block missing required '{field}' field")
            calls.append(_tool_call(block.get("id") or "", str(block.get("name") or ""), block.get("input") or {}))
        elif kind == "tool_result":
            results.append({"role": "tool", "content": _anthropic_text(block.get("content")),
                            "tool_call_id": block.get("tool_use_id")})
    own = [{"role": role, "content": text, **({"tool_calls": calls} if calls else {})}] if text or calls else []
    return results + own if role == "user" else own + results


def anthropic_request(data):
    """(messages, tools) of an Anthropic Messages request as Ollama's (anthropic.FromMessagesRequest): the system
    string or text blocks first, then every message; tools' input_schema as parameters."""
    system = _anthropic_text(data.get("system"))
    messages = [{"role": "system", "content": system}] if system else []
    for msg in data.get("messages") or []:
        messages += anthropic_message(msg)
    tools = [_function_tool(t.get("name"), t.get("description"), t.get("input_schema"))
             for t in data.get("tools") or [] if isinstance(t, dict)]
    return messages, tools


def embed_inputs(value):
    """/api/embed's input as a list of texts (an empty string is no input), or None when it is not text."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


# --------------------------------------------------------------------------- answers in each API's dialect


class Job:
    """One inference request in Ollama's own terms, whatever API it came in: the model as named and its store entry,
    keep_alive, the prompt as emulated tokens (empty: load only), the answer's length, whether it is a chat (the
    slot then keeps the answer as history) and the tool call to answer with."""

    def __init__(self, name, info, keep_alive, tokens, n_tokens, limited, chat=False, call=None):
        self.name, self.info, self.keep_alive = name, info, keep_alive
        self.tokens, self.n_tokens, self.limited = tokens, n_tokens, limited
        self.chat, self.call = chat, call


class Answer:
    """What one inference produced: text pieces or tool calls, counts and timings, which every dialect's closing
    event reports."""

    def __init__(self, job, started, load_duration):
        self.model = job.name
        self.started, self.load_duration = started, load_duration
        self.pieces, self.calls = [], []
        self.prompt_tokens = prompt_len(job.tokens)
        self.evaluated = self.n_tokens = 0
        self.prompt_s = self.eval_s = 0.0
        self.done_reason = "load"

    @property
    def text(self):
        return "".join(self.pieces)

    def message(self):
        """The answer as an Ollama chat message."""
        return {"role": "assistant", "content": self.text, **({"tool_calls": self.calls} if self.calls else {})}

    def timings(self):
        return _timings(self.started, self.load_duration, self.evaluated, self.prompt_s, self.n_tokens, self.eval_s)

    def usage(self):
        """(input, output) tokens for the OpenAI and Anthropic usage fields: the whole prompt, as current Ollama's
        prompt_eval_count counts it (llama-server's cache_n + prompt_n), and the answer."""
        return (self.prompt_tokens if self.n_tokens else 0), self.n_tokens

    def openai_usage(self):
        prompt, completion = self.usage()
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def empty_answer(resp, data, empty, reason):
    """Ollama's answer to an empty prompt or message list: the model unloaded (keep_alive 0) or loaded."""
    resp.json(200, {"model": data["model"], "created_at": go_time(), **empty, "done": True, "done_reason": reason})


def encoded_json(resp, status, obj):
    """A body as Ollama's middleware writers encode it (json.NewEncoder: a newline after it, no charset)."""
    resp.send(status, compact_json(obj) + "\n", "application/json")


def openai_error(resp, status, message, abort=False):
    """OpenAI's error object (openai.NewError): a handler's error rewritten by the middleware's writer, or with
    abort=True the middleware's own refusal (gin's JSON, with charset)."""
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    body = {"error": {"message": message, "type": etype, "param": None, "code": None}}
    resp.json(status, body) if abort else encoded_json(resp, status, body)


def anthropic_error(resp, status, message, abort=False):
    """Anthropic's error object as Ollama's anthropic middleware writes it (anthropic.NewError)."""
    etype = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
             529: "overloaded_error"}.get(status, "api_error")
    body = {"type": "error", "error": {"type": etype, "message": message}, "request_id": "req_" + os.urandom(12).hex()}
    resp.json(status, body) if abort else encoded_json(resp, status, body)


def openai_tool_calls(calls):
    """Tool calls as OpenAI writes them (openai.ToToolCalls): arguments as JSON text."""
    return [{"id": call["id"], "index": call["function"]["index"], "type": "function",
             "function": {"name": call["function"]["name"], "arguments": compact_json(call["function"]["arguments"])}}
            for call in calls]


class Dialect:
    """How one API writes an answer. The emulator calls error() (instead of any answer), loaded() for a load-only
    request, or begin(), text() per token or tool_calls() once, then finish(). Subclasses own their shapes."""

    stream_type = "text/event-stream"

    def __init__(self, resp, data, stream):
        self.resp, self.data, self.stream = resp, data, stream
        self.created = int(time.time())

    def error(self, status, message):
        self.resp.error(status, message)

    def begin(self, answer):
        if self.stream:
            self.resp.start_stream(self.stream_type)

    def text(self, piece):
        pass

    def tool_calls(self, calls):
        pass

    def loaded(self, answer):
        self.begin(answer)
        self.finish(answer)

    def finish(self, answer):
        raise NotImplementedError

    def sse(self, obj, event=None, sort_keys=False):
        """One server-sent event: `data: JSON`, after `event: NAME` when named (sort_keys: a Go map, not a struct)."""
        head = f"event: {event}\n" if event else ""
        body = json.dumps(obj, separators=(",", ":"), sort_keys=sort_keys)
        self.resp.chunk(f"{head}data: {body}\n\n")


class NativeGenerate(Dialect):
    """/api/generate: NDJSON {model, created_at, response, done} per token, then the final object with timings."""

    stream_type = "application/x-ndjson"

    def __init__(self, resp, data, stream):
        super().__init__(resp, data, stream)
        self.head = '{"model":' + json.dumps(data["model"]) + ',"created_at":"'

    def text(self, piece):
        if self.stream:
            self.resp.chunk(f'{self.head}{go_time()}","response":{json.dumps(piece)},"done":false}}\n')

    def loaded(self, answer):
        empty_answer(self.resp, self.data, {"response": ""}, "load")

    def finish(self, a):
        _send_final(self.resp, self.stream, {
            "model": a.model, "created_at": go_time(), "response": "" if self.stream else a.text, "done": True,
            "done_reason": a.done_reason, "context": list(range(1, min(a.prompt_tokens + a.n_tokens, 2048) + 1)),
            **a.timings()})


class NativeChat(NativeGenerate):
    """/api/chat: NDJSON {model, created_at, message, done} per token (a tool call is one line whose message has
    tool_calls), then the final object with timings."""

    def text(self, piece):
        if self.stream:
            self.resp.chunk(f'{self.head}{go_time()}","message":{{"role":"assistant","content":{json.dumps(piece)}}},'
                            '"done":false}\n')

    def tool_calls(self, calls):
        if self.stream:
            self.resp.chunk(compact_json({"model": self.data["model"], "created_at": go_time(), "message": {
                "role": "assistant", "content": "", "tool_calls": calls}, "done": False}) + "\n")

    def loaded(self, answer):
        empty_answer(self.resp, self.data, {"message": {"role": "assistant", "content": ""}}, "load")

    def finish(self, a):
        _send_final(self.resp, self.stream, {
            "model": a.model, "created_at": go_time(),
            "message": {"role": "assistant", "content": ""} if self.stream else a.message(), "done": True,
            "done_reason": a.done_reason, **a.timings()})


class OpenAIChat(Dialect):
    """/v1/chat/completions (openai.ToChatCompletion, ToStreamChunks, FinishChunk): SSE chunks with the role in the
    first only, a finish chunk with an empty delta, a usage chunk with stream_options.include_usage, [DONE]."""

    def __init__(self, resp, data, stream):
        super().__init__(resp, data, stream)
        self.ident = f"chatcmpl-{_rand_id(999)}"
        self.role_sent = False
        self.top = {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                    "model": data.get("model"), "system_fingerprint": "fp_ollama"}
        self.head = "data: " + compact_json(self.top)[:-1] + ',"choices":['

    def error(self, status, message):
        openai_error(self.resp, status, message)

    def _role(self):
        role, self.role_sent = ('' if self.role_sent else '"role":"assistant",'), True
        return role

    def text(self, piece):
        if self.stream:
            self.resp.chunk(f'{self.head}{{"index":0,"delta":{{{self._role()}"content":{json.dumps(piece)}}},'
                            '"finish_reason":null}]}\n\n')

    def tool_calls(self, calls):
        if self.stream:
            delta = f'{{{self._role()}"content":"","tool_calls":{compact_json(openai_tool_calls(calls))}}}'
            self.resp.chunk(f'{self.head}{{"index":0,"delta":{delta},"finish_reason":null}}]}}\n\n')

    def finish(self, a):
        reason = "tool_calls" if a.done_reason == "stop" and a.calls else a.done_reason
        if not self.stream:
            message = {"role": "assistant", "content": a.text}
            if a.calls:
                message["tool_calls"] = openai_tool_calls(a.calls)
            encoded_json(self.resp, 200, {**self.top, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": reason}], "usage": a.openai_usage()})
            return
        if not self.role_sent:
            self.text("")
        self.sse({**self.top, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
        if (self.data.get("stream_options") or {}).get("include_usage"):
            self.sse({**self.top, "choices": [], "usage": a.openai_usage()})
        self.resp.chunk("data: [DONE]\n\n")


class OpenAICompletion(Dialect):
    """/v1/completions (openai.ToCompletion, ToCompleteChunk): SSE text_completion chunks, the last with the
    finish_reason; with stream_options.include_usage every chunk carries a zero usage and one more the real one;
    [DONE]."""

    def __init__(self, resp, data, stream):
        super().__init__(resp, data, stream)
        self.ident = f"cmpl-{_rand_id(999)}"
        self.include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

    def error(self, status, message):
        openai_error(self.resp, status, message)

    def _object(self, choices, usage):
        obj = {"id": self.ident, "object": "text_completion", "created": self.created, "choices": choices,
               "model": self.data.get("model"), "system_fingerprint": "fp_ollama"}
        return {**obj, "usage": usage} if usage else obj

    def _chunk(self, text, reason):
        zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0} if self.include_usage else None
        self.sse(self._object([{"text": text, "index": 0, "finish_reason": reason}], zero))

    def text(self, piece):
        if self.stream:
            self._chunk(piece, None)

    def finish(self, a):
        if not self.stream:
            encoded_json(self.resp, 200, self._object(
                [{"text": a.text, "index": 0, "finish_reason": a.done_reason}], a.openai_usage()))
            return
        self._chunk("", a.done_reason)
        if self.include_usage:
            self.sse(self._object([], a.openai_usage()))
        self.resp.chunk("data: [DONE]\n\n")


class Responses(Dialect):
    """/v1/responses (openai.ToResponse, ResponsesStreamConverter): named SSE events with sequence numbers:
    response.created, response.in_progress, then a message item (output_item.added, content_part.added,
    output_text.delta per token, output_text.done, content_part.done, output_item.done) or a function_call item
    (output_item.added, function_call_arguments.delta/.done, output_item.done), and response.completed with the
    whole response and its usage; without stream, the response object."""

    def __init__(self, resp, data, stream):
        super().__init__(resp, data, stream)
        self.response_id, self.item_id = f"resp_{_rand_id(999999)}", f"msg_{_rand_id(999999)}"
        self.sequence = 0
        self.started_text = False
        self.calls = []

    def error(self, status, message):
        openai_error(self.resp, status, message)

    def event(self, name, **fields):
        self.sse({**fields, "type": name, "sequence_number": self.sequence}, name, sort_keys=True)
        self.sequence += 1

    def response(self, status, output, usage):
        """The response object, echoing the request's settings as Ollama does."""
        data = self.data
        reasoning = data.get("reasoning") if isinstance(data.get("reasoning"), dict) else {}
        tools = [{"type": t.get("type"), "name": t.get("name"), "description": t.get("description"),
                  "strict": t.get("strict"), "parameters": t.get("parameters")}
                 for t in data.get("tools") or [] if isinstance(t, dict)]
        return {
            "id": self.response_id, "object": "response", "created_at": self.created,
            "completed_at": int(time.time()) if status == "completed" else None, "status": status,
            "incomplete_details": None, "model": data.get("model"), "previous_response_id": None,
            "instructions": data.get("instructions") or None, "output": output, "error": None, "tools": tools,
            "tool_choice": "auto", "truncation": data.get("truncation") or "disabled", "parallel_tool_calls": True,
            "text": {"format": ((data.get("text") or {}).get("format")) or {"type": "text"}},
            "top_p": data.get("top_p", 1.0), "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
            "temperature": data.get("temperature", 1.0),
            "reasoning": ({"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
                          if reasoning.get("effort") or reasoning.get("summary") else None),
            "usage": usage, "max_output_tokens": data.get("max_output_tokens"), "max_tool_calls": None,
            "store": False, "background": bool(data.get("background")), "service_tier": "default", "metadata": {},
            "safety_identifier": None, "prompt_cache_key": None}

    def _message(self, status, text):
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                "content": [part] if status == "completed" else []}

    def begin(self, answer):
        super().begin(answer)
        if self.stream:
            for name in ("response.created", "response.in_progress"):
                self.event(name, response=self.response("in_progress", [], None))

    def text(self, piece):
        if not self.stream:
            return
        if not self.started_text:
            self.started_text = True
            self.event("response.output_item.added", output_index=0, item=self._message("in_progress", ""))
            self.event("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                       part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        self.event("response.output_text.delta", item_id=self.item_id, output_index=0, content_index=0, delta=piece,
                   logprobs=[])

    def _call_items(self, calls):
        return [{"id": f"fc_{self.response_id}_{i}", "type": "function_call", "status": "completed",
                 "call_id": call["id"], "name": call["function"]["name"], "arguments": call["function"]["arguments"]}
                for i, call in enumerate(openai_tool_calls(calls))]

    def tool_calls(self, calls):
        if not self.stream:
            return
        for index, item in enumerate(self._call_items(calls)):
            self.event("response.output_item.added", output_index=index,
                       item={**item, "status": "in_progress", "arguments": ""})
            self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                       delta=item["arguments"])
            self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       arguments=item["arguments"])
            self.event("response.output_item.done", output_index=index, item=item)

    def finish(self, a):
        prompt, completion = a.usage()
        usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
                 "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
        output = self._call_items(a.calls) if a.calls else [self._message("completed", a.text)]
        if not self.stream:
            encoded_json(self.resp, 200, self.response("completed", output, usage))
            return
        if self.started_text:
            part = output[0]["content"][0]
            self.event("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                       text=a.text, logprobs=[])
            self.event("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0, part=part)
            self.event("response.output_item.done", output_index=0, item=output[0])
        self.event("response.completed",
                   response=self.response("completed", output if a.calls or self.started_text else [], usage))


class Anthropic(Dialect):
    """/v1/messages (anthropic.ToMessagesResponse, StreamConverter): SSE message_start (the input tokens),
    content_block_start/delta/stop for the text and for each tool_use (its input as one input_json_delta),
    message_delta (stop_reason and usage), message_stop; without stream, the message object."""

    def __init__(self, resp, data, stream):
        super().__init__(resp, data, stream)
        self.ident = "msg_" + os.urandom(12).hex()
        self.index = 0
        self.started_text = False

    def error(self, status, message):
        anthropic_error(self.resp, status, message)

    def event(self, name, **fields):
        self.sse({"type": name, **fields}, name)

    def begin(self, answer):
        super().begin(answer)
        if self.stream:
            self.event("message_start", message={
                "id": self.ident, "type": "message", "role": "assistant", "model": self.data.get("model"),
                "content": [], "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 0}})

    def text(self, piece):
        if not self.stream:
            return
        if not self.started_text:
            self.started_text = True
            self.event("content_block_start", index=self.index, content_block={"type": "text", "text": ""})
        self.event("content_block_delta", index=self.index, delta={"type": "text_delta", "text": piece})

    def _close_text(self):
        if self.started_text:
            self.started_text = False
            self.event("content_block_stop", index=self.index)
            self.index += 1

    def tool_calls(self, calls):
        if not self.stream:
            return
        self._close_text()
        for call in calls:
            function = call["function"]
            self.event("content_block_start", index=self.index,
                       content_block={"type": "tool_use", "id": call["id"], "name": function["name"], "input": {}})
            self.event("content_block_delta", index=self.index,
                       delta={"type": "input_json_delta", "partial_json": compact_json(function["arguments"])})
            self.event("content_block_stop", index=self.index)
            self.index += 1

    def finish(self, a):
        reason = "tool_use" if a.calls else {"stop": "end_turn", "length": "max_tokens"}.get(a.done_reason,
                                                                                            "stop_sequence")
        prompt, completion = a.usage()
        if not self.stream:
            content = [{"type": "text", "text": a.text}] if a.text else []
            content += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                         "input": c["function"]["arguments"]} for c in a.calls]
            encoded_json(self.resp, 200, {
                "id": self.ident, "type": "message", "role": "assistant", "model": self.data.get("model"),
                "content": content, "stop_reason": reason,
                "usage": {"input_tokens": prompt, "output_tokens": completion}})
            return
        self._close_text()
        self.event("message_delta", delta={"stop_reason": reason},
                   usage={"input_tokens": prompt, "output_tokens": completion})
        self.event("message_stop")


class Emulator:
    def __init__(self, settings):
        self.settings = settings
        self.spec = load_gpu_spec(settings.gpu_spec_path)
        self.gpus = visible_gpus(self.spec, settings.cuda_visible_devices)
        self.store = ModelStore(settings)
        self.meta_cache = {}  # manifest digest -> (model_info, template, capabilities)
        self.sched = None
        self.server = None
        self.counter = 0

    async def start(self):
        self.sched = Scheduler(self.settings, self.gpus)
        self.sched.start()
        host = self.settings.host or None
        self.server = await asyncio.start_server(self.handle_client, host=host, port=self.settings.port,
                                                 reuse_address=True, backlog=1024, limit=65536)
        return self.server

    # -- connection loop
    async def handle_client(self, reader, writer):
        conn = Connection(reader, writer)
        peer = writer.get_extra_info("peername")
        peer = peer[0] if peer else "-"
        try:
            while True:
                try:
                    request = await conn.read_request()
                except BadRequest as exc:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(str(exc)), str(exc).encode()))
                    break
                if request is None:
                    break
                response = Response(writer, request)
                started = time.monotonic()
                task = asyncio.current_task()
                watcher = asyncio.get_running_loop().create_task(conn.watch_disconnect(task))
                try:
                    await self.dispatch(request, response)
                except asyncio.CancelledError:
                    if not conn.eof:
                        raise
                    response.status = response.status or 499
                    self.access_log(response.status, started, peer, request)
                    break
                except (ConnectionError, OSError):
                    break
                finally:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
                if response.streaming:
                    response.end_stream()
                self.access_log(response.status, started, peer, request)
                await writer.drain()
                if not response.keep_alive or conn.eof:
                    break
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def access_log(self, status, started, peer, request):
        if self.settings.access_log:
            took = f"{(time.monotonic() - started) * 1000:.3f}ms"
            stamp = time.strftime("%Y/%m/%d - %H:%M:%S")
            sys.stderr.write(f'[GIN] {stamp} | {status:3d} | {took:>13} | {peer:>15} | {request.method:<7} "{request.path}"\n')

    async def dispatch(self, req, resp):
        method = "GET" if req.method == "HEAD" else req.method
        routes = {
            ("GET", "/"): self.root,
            ("GET", "/api/version"): self.version,
            ("GET", "/api/tags"): self.tags,
            ("GET", "/api/ps"): self.ps,
            ("POST", "/api/show"): self.show,
            ("POST", "/api/generate"): self.generate,
            ("POST", "/api/chat"): self.chat,
            ("POST", "/api/pull"): self.pull,
            ("POST", "/api/copy"): self.copy,
            ("DELETE", "/api/delete"): self.delete,
            ("POST", "/api/embed"): self.embed,
            ("POST", "/api/embeddings"): self.embeddings,
            ("POST", "/v1/chat/completions"): self.openai_chat,
            ("POST", "/v1/completions"): self.openai_completions,
            ("POST", "/v1/embeddings"): self.openai_embeddings,
            ("POST", "/v1/responses"): self.openai_responses,
            ("POST", "/v1/messages"): self.anthropic_messages,
            ("GET", "/v1/models"): self.openai_models,
        }
        handler = routes.get((method, req.path))
        if handler is None and req.path != "/" and (method, req.path.rstrip("/")) in routes:
            # gin's RedirectTrailingSlash: 301 for GET, 307 for other methods, to the path without the slash.
            code, target = (301 if method == "GET" else 307), req.path.rstrip("/")
            body = f'<a href="{target}">{http.HTTPStatus(code).phrase}</a>.\n\n'.encode() if method == "GET" else b""
            resp._head(code, [("Content-Type", "text/html; charset=utf-8"), ("Location", target),
                              ("Content-Length", str(len(body)))])
            if not resp.head_only:
                resp.writer.write(body)
            return
        if handler is None:
            resp.send(404, "404 page not found", "text/plain")
            return
        await handler(req, resp)

    def body_json(self, req, resp):
        if not req.body:
            resp.error(400, "missing request body")
            return None
        try:
            data = json.loads(req.body)
        except ValueError as exc:
            resp.error(400, f"invalid character in JSON body: {exc}")
            return None
        if not isinstance(data, dict):
            resp.error(400, "json: cannot unmarshal into Go value of type api.Request")
            return None
        return data

    # -- simple endpoints
    async def root(self, req, resp):
        resp.send(200, "Ollama is running", "text/plain; charset=utf-8")

    async def version(self, req, resp):
        resp.json(200, {"version": VERSION})

    async def tags(self, req, resp):
        models = [{
            "name": info.name, "model": info.name, "modified_at": go_time(info.modified),
            "size": info.size, "digest": info.digest, "details": info.details(),
        } for info in self.store.list()]
        resp.json(200, {"models": models})

    async def ps(self, req, resp):
        resp.json(200, {"models": self.sched.ps()})

    async def show(self, req, resp):
        data = self.body_json(req, resp)
        if data is None:
            return
        name = data.get("model") or data.get("name") or ""
        if not name:
            resp.error(400, "model is required")
            return
        info = self.store.resolve(name)
        if info is None:
            resp.error(404, f"model '{name}' not found")
            return
        model_info, template, capabilities = self._model_meta(info)
        params = self._read_layer(info, ".params")
        license_text = self._read_layer(info, ".license")
        model_blob = self.store.blob_path(self._layer_digest(info, ".model") or "")
        body = {
            "license": license_text,
            "modelfile": f"# Modelfile generated by \"ollama show\" (herd emulator)\nFROM {model_blob}\nTEMPLATE \"\"\"{template}\"\"\"\n",
            "parameters": "\n".join(f"{k:<30} {json.dumps(x)}" for k, v in (json.loads(params or "{}")).items()
                                    for x in (v if isinstance(v, list) else [v])),
            "template": template,
            "details": info.details(),
            "model_info": model_info,
            "capabilities": capabilities,
            "modified_at": go_time(info.modified),
        }
        # Empty license and parameters are left out, as Ollama's ShowResponse does (omitempty).
        resp.json(200, {key: val for key, val in body.items() if val != "" or key not in ("license", "parameters")})

    def _layer_digest(self, info, suffix):
        for layer in info.manifest.get("layers", []):
            if layer.get("mediaType", "").endswith(suffix):
                return layer["digest"]
        return None

    def _read_layer(self, info, suffix):
        digest = self._layer_digest(info, suffix)
        if digest is None:
            return ""
        try:
            with open(self.store.blob_path(digest), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    async def delete(self, req, resp):
        data = self.body_json(req, resp)
        if data is None:
            return
        name = data.get("model") or data.get("name") or ""
        if not self.store.delete(name):
            resp.error(404, f"model '{name}' not found")
            return
        resp.send(200, b"", "text/plain")

    # -- inference
    async def acquire(self, resp, info, keep_alive, error=None):
        """Schedule like Ollama; returns the Runner or None after writing the error response (with error(status,
        message), by default resp.error)."""
        error = error or resp.error
        try:
            fut = self.sched.get_runner(info, keep_alive)
        except ModelError as exc:
            error(exc.status, exc.message)
            return None
        try:
            return await fut
        except ModelError as exc:
            error(exc.status, exc.message)
            return None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.sched.finished(fut.result())
            else:
                fut.cancel()
            raise

    def _common_inference_checks(self, data, resp):
        """Returns (info, keep_alive, options) or None after writing an error."""
        name = data.get("model") or ""
        if not name:
            resp.error(400, "model is required")
            return None
        try:
            keep_alive = parse_keep_alive_request(data.get("keep_alive"))
        except ValueError as exc:
            resp.error(400, str(exc))
            return None
        info = self.store.resolve(name)
        if info is None:
            # Text of current Ollama's GenerateHandler/ChatHandler (0.3.x said: model "x" not found, try pulling it first).
            resp.error(404, f"model '{name}' not found")
            return None
        options = data.get("options") or {}
        return info, keep_alive, options

    def _answer_length(self, options, override=None):
        num_predict = override if override is not None else options.get("num_predict")
        if isinstance(num_predict, int) and num_predict > 0:
            return num_predict, True
        return self.settings.response_tokens, False

    async def _run_tokens(self, runner, prompt_tokens, n_tokens, emit, resp, copy_seconds=0.0):
        """Simulate prompt eval (Runner.prefill) then n_tokens at the runner's current rate; emit(i, text) per
        token. Returns (prompt seconds, eval seconds) as simulated, for prompt_eval_duration / eval_duration."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await runner.prefill(prompt_tokens, copy_seconds)
        t1 = loop.time()
        target = t1
        if n_tokens:
            runner.generating += 1
        try:
            for i in range(n_tokens):
                target += 1.0 / runner.token_rate()
                delay = target - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                # A prompt chunk in progress on this runner: llama.cpp puts this token in the same step as the
                # chunk, so it comes when the chunk is done (one token per chunk while another slot prefills).
                end = runner.chunk_end
                if end > loop.time():
                    await asyncio.sleep(end - loop.time())
                    target = max(target, end)
                word = WORDS[i % len(WORDS)]
                emit(i, word if i == 0 else " " + word)
                if i % 16 == 15:
                    await resp.drain()
        finally:
            if n_tokens:
                runner.generating -= 1
        t2 = loop.time()
        return t1 - t0, t2 - t1

    def _model_meta(self, info):
        """(model_info, template, capabilities) of a model from its GGUF and template layer, read once per manifest."""
        meta = self.meta_cache.get(info.digest)
        if meta is None:
            # Ollama's default template when the model has none.
            template = self._read_layer(info, ".template") or "{{ .Prompt }}"
            model_blob = self.store.blob_path(self._layer_digest(info, ".model") or "")
            model_info = read_gguf_info(model_blob) or {"general.architecture": info.config.get("model_family", "")}
            meta = self.meta_cache[info.digest] = (model_info, template, model_capabilities(model_info, template))
        return meta

    def _refused(self, name, info, want, verb, error):
        """Ollama's capability check before scheduling (scheduleRunner): True after writing the 400 when the model
        lacks one of `want`. Without "completion" the handler's own text (`"NAME" does not support generate`/`chat`),
        else handleScheduleError's (`FULL/NAME:TAG does not support tools`)."""
        missing = [cap for cap in want if cap not in self._model_meta(info)[2]]
        if not missing:
            return False
        if "completion" in missing:
            error(400, f"{json.dumps(name)} does not support {verb}")
        else:
            host, namespace, model, tag = parse_model_name(info.name)
            error(400, "{}/{}/{}:{} does not support {}".format(host, namespace, model, tag, "\n".join(missing)))
        return True

    def _generate_job(self, name, info, keep_alive, system, prompt, num_predict):
        """A completion: the template's 4 tokens around system + prompt; an empty prompt loads the model only."""
        n_tokens, limited = self._answer_length({}, num_predict)
        return Job(name, info, keep_alive, generate_tokens(system, prompt) if prompt else [], n_tokens, limited)

    def _chat_job(self, name, info, keep_alive, messages, tools, num_predict):
        """A chat: the rendered tools and messages; the answer is a tool call when tool_call_for says so (as long
        as its text), else num_predict tokens of text; no messages loads the model only."""
        n_tokens, limited = self._answer_length({}, num_predict)
        call = tool_call_for(messages, tools)
        if call is not None:
            n_tokens, limited = estimate_tokens(tool_call_text(call)), False
        tokens = chat_tokens(messages, tools) if messages else []
        return Job(name, info, keep_alive, tokens, n_tokens, limited, chat=True, call=call)

    async def _infer(self, resp, job, out):
        """Schedule the job's model, take a slot for its prompt (the cached prefix is not evaluated again), then
        answer with its tool call or with text at the slot's rate, every piece written in the request's dialect."""
        started = time.monotonic()
        runner = await self.acquire(resp, job.info, job.keep_alive, out.error)
        if runner is None:
            return
        try:
            # Like Ollama: load_duration is the time from arrival until the scheduler handed over a runner.
            answer = Answer(job, started, time.monotonic() - started)
            if not job.tokens:
                out.loaded(answer)
                return
            # Like Ollama's handlers: nothing is written (not even the status line of a stream) until the runner's
            # first piece, so a dialect's opening events (message_start, response.created) come with the first token.
            begun = False

            def begin():
                nonlocal begun
                if not begun:
                    begun = True
                    out.begin(answer)

            def emit(_i, piece):
                begin()
                answer.pieces.append(piece)
                out.text(piece)

            async with runner.slot(job.tokens) as use:
                answer.evaluated, answer.n_tokens = answer.prompt_tokens - use.cached, job.n_tokens
                answer.prompt_s, answer.eval_s = await self._run_tokens(
                    runner, answer.evaluated, job.n_tokens, emit if job.call is None else _silent, resp,
                    use.copy_seconds)
                if job.call is not None:
                    begin()
                    answer.calls = [job.call]
                    out.tool_calls(answer.calls)
                if job.chat:
                    use.keep = chat_kept_tokens(job.tokens, answer.message())
            answer.done_reason = "length" if job.limited else "stop"
            begin()
            out.finish(answer)
        finally:
            self.sched.finished(runner)

    def _inference_request(self, req, resp):
        """(data, info, keep_alive, options, stream) of a native generate or chat request, or None after writing the
        error response."""
        data = self.body_json(req, resp)
        if data is None:
            return None
        checked = self._common_inference_checks(data, resp)
        if checked is None:
            return None
        return (data, *checked, data.get("stream", True) is not False)

    async def generate(self, req, resp):
        request = self._inference_request(req, resp)
        if request is None:
            return
        data, info, keep_alive, options, stream = request
        prompt = data.get("prompt") or ""
        if prompt == "" and keep_alive == 0:
            self.sched.expire(info)
            empty_answer(resp, data, {"response": ""}, "unload")
            return
        if self._refused(data["model"], info, ["completion"] + (["insert"] if data.get("suffix") else []),
                         "generate", resp.error):
            return
        job = self._generate_job(data["model"], info, keep_alive, str(data.get("system") or ""), prompt,
                                 options.get("num_predict"))
        await self._infer(resp, job, NativeGenerate(resp, data, stream))

    async def chat(self, req, resp):
        request = self._inference_request(req, resp)
        if request is None:
            return
        data, info, keep_alive, options, stream = request
        messages = data.get("messages") or []
        if not messages and keep_alive == 0:
            self.sched.expire(info)
            empty_answer(resp, data, {"message": {"role": "assistant", "content": ""}}, "unload")
            return
        tools = data.get("tools") if isinstance(data.get("tools"), list) else None
        if self._refused(data["model"], info, ["completion"] + (["tools"] if tools else []), "chat", resp.error):
            return
        job = self._chat_job(data["model"], info, keep_alive, messages, tools, options.get("num_predict"))
        await self._infer(resp, job, NativeChat(resp, data, stream))

    # -- OpenAI and Anthropic compatibility (Ollama's middleware in front of its own handlers)
    @staticmethod
    def _middleware_body(req, resp, error):
        """A request's JSON object as the middleware binds it, or None after its 400 (gin's bind error)."""
        try:
            data = json.loads(req.body or b"")
        except ValueError as exc:
            error(resp, 400, f"invalid character in JSON body: {exc}" if req.body else "EOF", abort=True)
            return None
        if not isinstance(data, dict):
            error(resp, 400, f"json: cannot unmarshal {go_kind(data)} into Go value of type map", abort=True)
            return None
        return data

    def _named_model(self, name, error, missing="model '{}' not found"):
        """The store entry of a request's model, or None after writing the handler's 400 or 404 with error()."""
        name = name if isinstance(name, str) else ""
        if not name.strip():
            error(400, "model is required")
            return None
        info = self.store.resolve(name)
        if info is None:
            error(404, missing.format(name))
        return info

    async def _dialect_chat(self, resp, data, messages, tools, num_predict, out):
        """A chat that came as OpenAI or Anthropic, as Ollama's middleware hands it to its chat handler."""
        name = data.get("model")
        info = self._named_model(name, out.error)
        if info is None or self._refused(name, info, ["completion"] + (["tools"] if tools else []), "chat",
                                         out.error):
            return
        await self._infer(resp, self._chat_job(name, info, None, messages, tools, num_predict), out)

    async def openai_models(self, req, resp):
        # Ollama's OpenAI middleware: owned_by is the name's namespace, and the type has no charset.
        resp.send(200, json.dumps({"object": "list", "data": [
            {"id": info.name, "object": "model", "created": int(info.modified),
             "owned_by": parse_model_name(info.name)[1]}
            for info in self.store.list()]}, separators=(",", ":")), "application/json")

    async def openai_chat(self, req, resp):
        """POST /v1/chat/completions."""
        data = self._middleware_body(req, resp, openai_error)
        if data is None:
            return
        if not data.get("messages") or not isinstance(data["messages"], list):
            openai_error(resp, 400, "[] is too short - 'messages'", abort=True)
            return
        try:
            messages = openai_messages(data["messages"])
        except ValueError as exc:
            openai_error(resp, 400, str(exc), abort=True)
            return
        tools = data.get("tools") if isinstance(data.get("tools"), list) else None
        await self._dialect_chat(resp, data, messages, tools, data.get("max_completion_tokens") or data.get("max_tokens"),
                                 OpenAIChat(resp, data, bool(data.get("stream"))))

    async def openai_completions(self, req, resp):
        """POST /v1/completions: the legacy completions API on Ollama's generate handler (prompt: one string)."""
        data = self._middleware_body(req, resp, openai_error)
        if data is None:
            return
        prompt = data.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            openai_error(resp, 400, f"json: cannot unmarshal {go_kind(prompt)} into Go struct field "
                         "CompletionRequest.prompt of type string", abort=True)
            return
        out = OpenAICompletion(resp, data, bool(data.get("stream")))
        name = data.get("model")
        info = self._named_model(name, out.error)
        if info is None or self._refused(name, info, ["completion"] + (["insert"] if data.get("suffix") else []),
                                         "generate", out.error):
            return
        await self._infer(resp, self._generate_job(name, info, None, "", prompt or "", data.get("max_tokens")), out)

    async def openai_responses(self, req, resp):
        """POST /v1/responses: the OpenAI Responses API on Ollama's chat handler."""
        data = self._middleware_body(req, resp, openai_error)
        if data is None:
            return
        try:
            messages, tools = responses_request(data)
        except ValueError as exc:
            openai_error(resp, 400, str(exc), abort=True)
            return
        await self._dialect_chat(resp, data, messages, tools, data.get("max_output_tokens"),
                                 Responses(resp, data, data.get("stream") is True))

    async def anthropic_messages(self, req, resp):
        """POST /v1/messages: the Anthropic Messages API on Ollama's chat handler (no /v1/messages/count_tokens:
        Ollama has the types but no route)."""
        data = self._middleware_body(req, resp, anthropic_error)
        if data is None:
            return
        max_tokens = data.get("max_tokens")
        refusal = ("model is required" if not data.get("model") else
                   "max_tokens is required and must be positive"
                   if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0 else
                   "messages is required" if not data.get("messages") else None)
        try:
            messages, tools = anthropic_request(data) if refusal is None else ([], [])
        except ValueError as exc:
            refusal = str(exc)
        if refusal is not None:
            anthropic_error(resp, 400, refusal, abort=True)
            return
        # max_tokens is required and large (a coding agent sends 32000): it caps the emulated answer's usual length
        # (HERD_EMU_RESPONSE_TOKENS) instead of setting it, so an answer ends with end_turn unless it is cut.
        cap = max_tokens if max_tokens < self.settings.response_tokens else None
        await self._dialect_chat(resp, data, messages, tools, cap, Anthropic(resp, data, data.get("stream") is True))

    # -- embeddings (any model embeds, as in Ollama: /api/embed asks for no capability)
    async def _embed(self, resp, data, inputs, error, missing="model '{}' not found"):
        """Embed `inputs` with data's model: scheduled like any inference, one slot held while their tokens are
        evaluated at the prompt rate; longer than the context, an input is cut (truncate false: refused).
        Returns (name, vectors, prompt tokens, timings) or None after writing the error with error(status, text)."""
        name = data.get("model")
        info = self._named_model(name, error, missing)
        if info is None:
            return None
        try:
            keep_alive = parse_keep_alive_request(data.get("keep_alive"))
        except ValueError as exc:
            error(400, str(exc))
            return None
        started = time.monotonic()
        runner = await self.acquire(resp, info, keep_alive, error)
        if runner is None:
            return None
        try:
            load_duration = time.monotonic() - started
            texts, count = [], 0
            for text in inputs:
                tokens = estimate_tokens(text)
                if tokens > runner.context_length:
                    if data.get("truncate") is False:
                        error(400, "the input length exceeds the context length")
                        return None
                    text, tokens = text[: runner.context_length * 4], runner.context_length
                texts.append(text)
                count += tokens
            if texts:
                # DIFFERS: Ollama embeds a request's inputs in parallel, one slot each; one slot for all here.
                async with runner.slot([(TEXT, text) for text in texts]):
                    await self._run_tokens(runner, count, 0, _silent, resp)
            model_info = self._model_meta(info)[0]
            dims = int(model_info.get(f"{model_info.get('general.architecture')}.embedding_length") or 0)
            vectors = [embedding_vector(info.name, text, dims or DEFAULT_EMBEDDING_LENGTH) for text in texts]
            wanted = data.get("dimensions")
            if isinstance(wanted, int) and not isinstance(wanted, bool) and 0 < wanted < (dims or DEFAULT_EMBEDDING_LENGTH):
                vectors = [normalize(vector[:wanted]) for vector in vectors]
            # An empty input only loads the model: no timings (omitempty in Ollama's EmbedResponse).
            timings = {"total_duration": _ns(time.monotonic() - started), "load_duration": _ns(load_duration)}
            return name, vectors, count, timings if texts else {}
        finally:
            self.sched.finished(runner)

    async def embed(self, req, resp):
        """POST /api/embed: input (a string or strings), truncate, dimensions -> {model, embeddings, timings}."""
        data = self.body_json(req, resp)
        if data is None:
            return
        inputs = embed_inputs(data.get("input"))
        if data.get("model") and inputs is None:
            resp.error(400, "invalid input type")
            return
        done = await self._embed(resp, data, inputs or [], resp.error)
        if done is not None:
            name, vectors, count, timings = done
            body = {"model": name, "embeddings": vectors, **timings, "prompt_eval_count": count}
            # total_duration, load_duration and prompt_eval_count are omitempty in Ollama's EmbedResponse.
            resp.json(200, {key: val for key, val in body.items() if val or key in ("model", "embeddings")})

    async def embeddings(self, req, resp):
        """POST /api/embeddings (the legacy API): prompt -> {embedding}; an empty prompt loads the model only."""
        data = self.body_json(req, resp)
        if data is None:
            return
        prompt = data.get("prompt")
        done = await self._embed(resp, data, [prompt] if isinstance(prompt, str) and prompt else [], resp.error,
                                 'model "{}" not found, try pulling it first')
        if done is not None:
            resp.json(200, {"embedding": done[1][0] if done[1] else []})

    async def openai_embeddings(self, req, resp):
        """POST /v1/embeddings: input (a string or strings), dimensions, encoding_format float or base64 (little-endian
        float32) -> {object: list, data: [{object: embedding, embedding, index}], model, usage}."""
        data = self._middleware_body(req, resp, openai_error)
        if data is None:
            return
        encoding = data.get("encoding_format") or ""
        if encoding and str(encoding).lower() not in ("float", "base64"):
            openai_error(resp, 400, f"Invalid value for 'encoding_format' = {encoding}. Supported values: "
                         "['float', 'base64'].", abort=True)
            return
        raw = [""] if data.get("input") == "" else data.get("input")
        if raw is None or raw == []:
            openai_error(resp, 400, "invalid input", abort=True)
            return
        inputs = embed_inputs(raw)
        if inputs is None:
            openai_error(resp, 400, "invalid input type")
            return
        done = await self._embed(resp, data, inputs, lambda status, message: openai_error(resp, status, message))
        if done is None:
            return
        name, vectors, count, _timings = done

        def encode(vector):
            if str(encoding).lower() != "base64":
                return vector
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

        encoded_json(resp, 200, {
            "object": "list", "data": [{"object": "embedding", "embedding": encode(v), "index": i}
                                       for i, v in enumerate(vectors)],
            "model": name, "usage": {"prompt_tokens": count, "total_tokens": count}})

    # -- pull over Ollama's registry protocol (a registry.ollama.ai, a site's registry, lab/standins/lab_registry.py)
    async def pull(self, req, resp):
        data = self.body_json(req, resp)
        if data is None:
            return
        name = data.get("model") or data.get("name") or ""
        stream = data.get("stream", True) is not False
        parsed = parse_model_name(name)
        events = []

        def send(obj):
            if stream:
                resp.chunk(json.dumps(obj, separators=(",", ":")) + "\n")
            else:
                events.append(obj)

        if parsed is None:
            resp.error(400, "invalid model name")
            return
        if stream:
            resp.start_stream("application/x-ndjson")
        try:
            await self._pull(parsed, data.get("insecure") is True, send, resp)
        except ModelError as exc:
            if stream:
                send({"error": exc.message})
            else:
                resp.error(exc.status, exc.message)
            return
        if not stream:
            resp.json(200, events[-1])

    @staticmethod
    def _registry_get(url, accept=None):
        """Body of a registry GET, following its redirects (a blob's goes to another host, as Ollama's CDN does).

        DIFFERS: Ollama sizes a blob with HEAD and fetches it in ranged parts; one GET here. 404 raises
        FileNotFoundError (Ollama's os.ErrNotExist); other errors say status and body as Ollama does.
        """
        request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        request.add_header("User-Agent", f"ollama/{VERSION} (amd64 linux) herd-emulator")
        try:
            with urllib.request.urlopen(request, timeout=30) as handle:
                return handle.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(url) from None
            raise ModelError(500, f"{exc.code}: {exc.read().decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ModelError(500, f'Get "{url}": {getattr(exc, "reason", exc)}') from None

    async def _pull(self, parsed, insecure, send, resp):
        host, namespace, model, tag = parsed
        # Ollama: https unless the request says insecure (then plain http), /v2/<namespace>/<model>/...
        base = "{}://{}/v2/{}/{}".format("http" if insecure else "https", host, namespace, model)
        send({"status": "pulling manifest"})
        try:
            manifest_bytes = await asyncio.to_thread(self._registry_get, f"{base}/manifests/{tag}", MEDIA_MANIFEST)
            manifest = json.loads(manifest_bytes)
            layers = list(manifest["layers"]) + [manifest["config"]]
            for layer in layers:
                layer["digest"], layer["size"]  # noqa: B018 - validate the manifest before pulling
        except FileNotFoundError:
            raise ModelError(500, "pull model manifest: file does not exist") from None
        except ModelError as exc:
            raise ModelError(500, f"pull model manifest: {exc.message}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(500, f"pull model manifest: {exc}") from None
        for layer in layers:
            digest, size = layer["digest"], int(layer["size"])
            target = self.store.blob_path(digest)
            status = "pulling {}".format(digest.split(":", 1)[-1][:12])
            if os.path.exists(target) and _file_sha256(target) == digest:
                send({"status": status, "digest": digest, "total": size, "completed": size})
                continue
            send({"status": status, "digest": digest, "total": size})
            try:
                data = await asyncio.to_thread(self._registry_get, f"{base}/blobs/{digest}")
            except FileNotFoundError:
                raise ModelError(500, f"pull model blob {digest}: file does not exist") from None
            step = 256 * 1024
            for done in range(step, len(data) + step, step):
                send({"status": status, "digest": digest, "total": size, "completed": min(done, len(data))})
            await resp.drain()
            got = "sha256:" + hashlib.sha256(data).hexdigest()
            if got != digest:
                raise ModelError(500, f"digest mismatch, file must be downloaded again: want {digest}, got {got}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = target + "-partial"
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        send({"status": "verifying sha256 digest"})
        for layer in layers:
            if _file_sha256(self.store.blob_path(layer["digest"])) != layer["digest"]:
                raise ModelError(500, "digest mismatch, file must be downloaded again: want {}".format(layer["digest"]))
        send({"status": "writing manifest"})
        # Stored under the name pulled, registry host (with its port) included, and written as Ollama writes it:
        # its own struct marshalled again (Go's json.Marshal: its field order, no unknown keys, no newline).
        self.store.write_manifest(parsed, go_manifest_bytes(manifest))
        send({"status": "success"})

    async def copy(self, req, resp):
        """POST /api/copy: the manifest written again under another name (Ollama's CopyModelHandler)."""
        data = self.body_json(req, resp)
        if data is None:
            return
        source, destination = data.get("source") or "", data.get("destination") or ""
        src, dst = parse_model_name(source), parse_model_name(destination)
        if src is None:
            resp.error(400, f"source {json.dumps(source)} is invalid")
            return
        if dst is None:
            resp.error(400, f"destination {json.dumps(destination)} is invalid")
            return
        if src != dst:
            try:
                with open(self.store.manifest_path(src), "rb") as handle:
                    manifest_bytes = handle.read()
            except FileNotFoundError:
                resp.error(404, f"model {json.dumps(source)} not found")
                return
            self.store.write_manifest(dst, manifest_bytes)
        resp.send(200, b"", "text/plain")


def go_manifest_bytes(manifest):
    """A manifest as Ollama's pull writes it: json.Marshal of its Manifest/Layer structs."""
    def layer(item):
        out = {"mediaType": item.get("mediaType", ""), "digest": item.get("digest", ""), "size": int(item.get("size", 0))}
        if item.get("from"):
            out["from"] = item["from"]
        return out

    doc = {"schemaVersion": int(manifest.get("schemaVersion", 0)), "mediaType": manifest.get("mediaType", ""),
           "config": layer(manifest["config"]), "layers": [layer(item) for item in manifest["layers"]]}
    return json.dumps(doc, separators=(",", ":")).encode()


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------- command line


def prune_unused_blobs(models_dir):
    """Ollama's start-up prune (unless OLLAMA_NOPRUNE): delete blobs/sha256-* that no manifest references."""
    store = ModelStore(Settings({"OLLAMA_MODELS": models_dir}))
    blobs = os.path.join(models_dir, "blobs")
    try:
        names = os.listdir(blobs)
    except OSError:
        return 0
    keep = {digest.replace(":", "-") for digest in store.referenced_digests()}
    removed = 0
    for name in names:
        if re.fullmatch(r"sha256-[0-9a-f]{64}", name) and name not in keep:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(blobs, name))
                removed += 1
    return removed


def extra_instances(settings, gpu_count):
    """Settings of the instances HERD_EMU_EXTRA_PORTS adds: the same but the port, and one simulated GPU each
    (the i-th extra instance: GPU (i + 1) modulo the spec's count; none on a CPU-only spec)."""
    import copy

    out = []
    for i, port in enumerate(settings.extra_ports):
        extra = copy.copy(settings)
        extra.port = port
        extra.extra_ports = []
        if gpu_count:
            extra.cuda_visible_devices = str((i + 1) % gpu_count)
        out.append(extra)
    return out


async def serve(settings):
    emulator = Emulator(settings)
    log("WARN", BANNER)
    server = await emulator.start()
    servers = [server]
    for extra in extra_instances(settings, len(visible_gpus(emulator.spec, None))):
        servers.append(await Emulator(extra).start())
    if settings.extra_ports:
        log("INFO", f"serving {len(settings.extra_ports)} more instances from this process",
            ports=f"{settings.extra_ports[0]}-{settings.extra_ports[-1]}")
    gpus = emulator.gpus
    if gpus:
        for gpu in gpus:
            log("INFO", "inference compute (simulated)", id=gpu["uuid"], library="cuda", name=gpu["name"],
                total="%.1f GiB" % (int(gpu["memory_total_mib"]) / 1024))
    else:
        log("INFO", "no compatible GPUs were discovered (simulated); running on CPU",
            spec=settings.gpu_spec_path, CUDA_VISIBLE_DEVICES=settings.cuda_visible_devices or "")
    log("INFO", "server config", OLLAMA_HOST=settings.listen_address, OLLAMA_MODELS=settings.models_dir,
        OLLAMA_NUM_PARALLEL=settings.num_parallel, OLLAMA_MAX_QUEUE=settings.max_queue,
        OLLAMA_MAX_LOADED_MODELS=settings.max_loaded, OLLAMA_KEEP_ALIVE=settings.keep_alive,
        OLLAMA_CONTEXT_LENGTH=settings.context_length, OLLAMA_NOPRUNE=settings.noprune,
        OLLAMA_NO_CLOUD=settings.no_cloud, OLLAMA_MULTIUSER_CACHE=settings.multiuser_cache,
        HERD_EMU_RUNNER=settings.runner, LLAMA_ARG_CACHE_RAM=settings.cache_ram_mib,
        LLAMA_ARG_CACHE_IDLE_SLOTS=settings.cache_idle_slots)
    if settings.runner == "llama-server" and settings.multiuser_cache:
        log("WARN", "OLLAMA_MULTIUSER_CACHE has no effect on the llama-server runner (Ollama 0.30+ removed it)")
    if not settings.noprune:
        removed = prune_unused_blobs(settings.models_dir)
        log("INFO", f"total unused blobs removed: {removed}")
    log("INFO", f"Listening on {settings.listen_address} (version {VERSION})",
        OLLAMA_NUM_PARALLEL=settings.num_parallel, OLLAMA_MAX_QUEUE=settings.max_queue,
        OLLAMA_MODELS=settings.models_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log("INFO", "shutting down")
    for one in servers:
        one.close()
    return 0


def _client_base(settings):
    host = settings.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{settings.scheme}://{host}:{settings.port}"


def _client_get(path):
    with urllib.request.urlopen(_client_base(Settings()) + path, timeout=10) as handle:
        return json.load(handle)


def _human_size(num):
    for unit in ("B", "KB", "MB", "GB"):
        if num < 1000 or unit == "GB":
            return f"{num} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1000.0
    return str(num)


def cli_list():
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    for model in _client_get("/api/tags")["models"]:
        rows.append((model["name"], model["digest"][:12], _human_size(model["size"]), model["modified_at"][:19]))
    _print_table(rows)


def cli_ps():
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "UNTIL")]
    for model in _client_get("/api/ps")["models"]:
        proc = "100% GPU" if model["size_vram"] else "100% CPU"
        rows.append((model["name"], model["digest"][:12], _human_size(model["size"]), proc, model["expires_at"][:19]))
    _print_table(rows)


def _print_table(rows):
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("    ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("herd lab stand-in for Ollama (not Ollama).\n\nUsage:\n  ollama serve | list | ps | --version")
        return 0
    if argv[0] in ("-v", "--version"):
        print(f"ollama version is {VERSION}")
        return 0
    if argv[0] == "serve":
        try:
            return asyncio.run(serve(Settings()))
        except OSError as exc:
            sys.stderr.write(f"Error: listen tcp {Settings().listen_address}: {exc.strerror or exc}\n")
            return 1
    if argv[0] in ("list", "ls", "ps"):
        try:
            cli_ps() if argv[0] == "ps" else cli_list()
        except (urllib.error.URLError, OSError):
            sys.stderr.write("Error: could not connect to ollama app, is it running?\n")
            return 1
        return 0
    sys.stderr.write(f"Error: unknown command \"{argv[0]}\" for \"ollama\" (herd lab stand-in supports serve, list, ps)\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
