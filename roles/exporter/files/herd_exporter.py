#!/usr/bin/python3
"""herd exporter: Prometheus metrics for a herd host (Ollama instances, GPUs, the nginx gateway).

Ollama has no /metrics endpoint, so this exporter gathers what an operator needs and serves it in the
Prometheus text exposition format (version 0.0.4) on /metrics:

- every instance of the host's plan (read from the config file, never re-derived): up, models loaded and their
  memory, from the instance's /api/ps;
- every GPU: utilisation and memory, from `nvidia-smi --query-gpu=... --format=csv,noheader,nounits`;
- the gateway on this host: requests by upstream and status, latency histograms (tailing the gateway's JSON
  access log, across rotation), requests in flight (from nginx stub_status) and, per model pool, the wait
  queue's depth, admissions, rejections and wait-time histogram (the gateway's loopback JSON /herd/pools).

Instance and GPU readings are shared by every scrape for `cache_seconds` (a scrape storm costs one nvidia-smi
and one /api/ps per instance); the HTTP server and the log poll loop are herd_service's (handler timeouts,
bounded workers, IPv4 or IPv6, systemd watchdog pinged while the loop is live).
Standard library and herd_service (herd's service library, on PYTHONPATH): it runs on the hosts with python3.
Usage: herd-exporter --config /etc/herd/exporter.json [--once]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import herd_service as hs
from herd_service import escape as escape_label
from herd_service import format_value

DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
GPU_QUERY = "index,uuid,utilization.gpu,memory.used,memory.total"
MIB = 1024 * 1024
NONE = "none"
# Time per output token at the gateway: tens of milliseconds on a GPU, up to a second on a slow or crowded one.
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
# The most (key, model) pairs the token counters keep: key names and pools are the gateway's configuration, so a
# log line naming more is not the gateway's (the rest are counted as "other").
MAX_TENANT_SERIES = 4096
# A scrape reads at most this much new log; the rest waits for the next poll (bounded work per call).
MAX_LOG_READ = 32 * MIB


# ---------------------------------------------------------------------------------------------------------
# Pure parsers: text -> data


def _number(text):
    """Float of an nvidia-smi field, or None for [N/A], [Not Supported] and empty fields."""
    text = text.strip()
    if not text or text.startswith("["):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_nvidia_smi(text):
    """Rows of `nvidia-smi --query-gpu=index,uuid,utilization.gpu,memory.used,memory.total` (csv, no units)."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            raise ValueError(f"nvidia-smi line has {len(fields)} fields, expected 5: {line!r}")
        index = _number(fields[0])
        if index is None or not fields[1]:
            raise ValueError(f"nvidia-smi line without index or uuid: {line!r}")
        gpus.append(
            {
                "index": int(index),
                "uuid": fields[1],
                "utilization_percent": _number(fields[2]),
                "memory_used_mib": _number(fields[3]),
                "memory_total_mib": _number(fields[4]),
            }
        )
    return gpus


def parse_stub_status(text):
    """nginx stub_status page -> {active, accepts, handled, requests, reading, writing, waiting}."""
    lines = [line.strip() for line in text.strip().splitlines()]
    try:
        if not lines[0].startswith("Active connections:"):
            raise ValueError
        active = int(lines[0].split(":", 1)[1])
        if lines[1].split() != ["server", "accepts", "handled", "requests"]:
            raise ValueError
        accepts, handled, requests = (int(v) for v in lines[2].split())
        words = lines[3].split()
        if [words[0], words[2], words[4]] != ["Reading:", "Writing:", "Waiting:"]:
            raise ValueError
        reading, writing, waiting = int(words[1]), int(words[3]), int(words[5])
    except (IndexError, ValueError) as exc:
        raise ValueError(f"not an nginx stub_status page: {text[:200]!r}") from exc
    return {
        "active": active,
        "accepts": accepts,
        "handled": handled,
        "requests": requests,
        "reading": reading,
        "writing": writing,
        "waiting": waiting,
    }


POOL_COUNTERS = ("admitted", "rejected_full", "rejected_timeout", "abandoned")
# Conversation affinity (gateways since issue 20; absent from older ones): requests whose conversation went back to
# its instance (hit), went elsewhere because that instance had no free slot or was down (miss), or was new.
AFFINITY_COUNTERS = (("hit", "affinity_hits"), ("miss", "affinity_misses"), ("new", "affinity_new"))


def _count(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
    return value


def _histogram(raw, what):
    """A histogram of /herd/pools ({"buckets": {bound: cumulative}, "sum", "count"}) -> {"buckets": [(upper bound as
    float, cumulative count)...] ending with +Inf, "sum", "count"}; ValueError unless it is one."""
    if not isinstance(raw, dict) or not isinstance(raw.get("buckets"), dict):
        raise ValueError(f"{what}.buckets missing")
    buckets = []
    for bound, value in raw["buckets"].items():
        try:
            upper = float(bound)
        except ValueError as exc:
            raise ValueError(f"{what}: bucket bound {bound!r}") from exc
        buckets.append((upper, _count(value, f"{what}: bucket {bound}")))
    buckets.sort()
    if not buckets or buckets[-1][0] != float("inf"):
        raise ValueError(f"{what} has no +Inf bucket")
    if any(b[1] > c[1] for b, c in zip(buckets, buckets[1:], strict=False)):
        raise ValueError(f"{what} buckets are not cumulative")
    count = _count(raw.get("count"), f"{what}.count")
    if buckets[-1][1] != count:
        raise ValueError(f"{what}: +Inf bucket {buckets[-1][1]} != count {count}")
    return {"buckets": buckets, "sum": _count(raw.get("sum"), f"{what}.sum"), "count": count}


def parse_pools(text):
    """The gateway's GET /herd/pools JSON -> [{name, queued, queue_max, counters..., wait, instances}].

    wait = {"buckets": [(upper bound as float, cumulative count)...] ending with +Inf, "sum": S, "count": N}.
    Raises ValueError on anything else, so that a wrong answer is a failed collector and never wrong numbers.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("pools"), list):
        raise ValueError('no "pools" list')
    pools = []
    for raw in data["pools"]:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ValueError(f"pool without a name: {raw!r}"[:200])
        name = raw["name"]
        pool = {"name": name, "queued": _count(raw.get("queued"), f"pool {name}: queued"),
                "queue_max": _count(raw.get("queue_max"), f"pool {name}: queue_max")}
        for key in POOL_COUNTERS:
            pool[key] = _count(raw.get(key), f"pool {name}: {key}")
        pool["wait"] = _histogram(raw.get("wait_seconds"), f"pool {name}: wait_seconds")
        # Prefix hits (gateways since prefix routing; absent from older ones and with gateway_affinity off).
        pool["prefix"] = None
        if raw.get("prefix_hit_bytes") is not None:
            pool["prefix"] = _histogram(raw["prefix_hit_bytes"], f"pool {name}: prefix_hit_bytes")
        # Waits for a prefix another request was evaluating (gateways since pending marks; prefix mode only).
        pool["prefix_waits"] = None
        if raw.get("prefix_waits") is not None:
            pool["prefix_waits"] = _count(raw["prefix_waits"], f"pool {name}: prefix_waits")
        instances = []
        for inst in raw.get("instances") or []:
            if not isinstance(inst, dict) or not inst.get("key"):
                raise ValueError(f"pool {name}: instance without a key")
            instances.append({"key": str(inst["key"]), "endpoint": str(inst.get("endpoint") or ""),
                              "inflight": _count(inst.get("inflight", 0), f"pool {name}: inflight"),
                              "max_conns": _count(inst.get("max_conns", 0), f"pool {name}: max_conns"),
                              "down": bool(inst.get("down"))})
        pool["instances"] = instances
        pool["affinity"] = None
        if any(key in raw for _result, key in AFFINITY_COUNTERS):
            pool["affinity"] = {result: _count(raw.get(key, 0), f"pool {name}: {key}")
                                for result, key in AFFINITY_COUNTERS}
        pools.append(pool)
    return pools


def parse_gateway_memory(text):
    """The gateway's GET /herd/pools JSON -> {"dicts": [{name, capacity, free_space}], "body_held": bytes or None}.
    A gateway from before the shared-state figures has neither: an empty list and None."""
    data = json.loads(text)
    dicts = []
    for raw in data.get("dicts") or []:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
            raise ValueError(f"shared dict without a name: {raw!r}"[:200])
        dicts.append({"name": raw["name"], "capacity": _count(raw.get("capacity"), f"dict {raw['name']}: capacity"),
                      "free_space": _count(raw.get("free_space"), f"dict {raw['name']}: free_space")})
    held = data.get("body_held")
    return {"dicts": dicts, "body_held": None if held is None else _count(held, "body_held")}


def parse_ps(text):
    """Ollama /api/ps body -> [{name, size, size_vram}]."""
    data = json.loads(text)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise ValueError("/api/ps answer has no models list")
    out = []
    for model in models:
        out.append(
            {
                "name": str(model.get("name") or model.get("model") or ""),
                "size": float(model.get("size") or 0),
                "size_vram": float(model.get("size_vram") or 0),
            }
        )
    return out


def _last(value):
    """Last entry of an nginx multi-value variable ("a, b : c" after retries and internal redirects)."""
    value = (value or "").strip()
    if not value or value == "-":
        return ""
    return value.replace(" : ", ", ").split(", ")[-1].strip()


def _seconds(value):
    last = _last(value)
    try:
        return float(last) if last else None
    except ValueError:
        return None


def _tokens(value):
    """A token count of the log ("" when the answer has none) -> int or None."""
    text = str(value or "")
    return int(text) if text.isdigit() and len(text) <= 12 else None


def parse_log_line(line):
    """One line of the gateway's JSON access log -> {upstream, status, request_time, header_time, bytes, attempts,
    key, pool, prompt_tokens, output_tokens, tokens_from, ttft, tpot, queue_wait}.

    `upstream` is the server that gave the final answer ("" when no instance was asked, or when nginx found no
    live upstream and wrote the group's name); `attempts` lists (upstream, upstream_status) of every try.
    Returns None for a line that is not a gateway log record.
    """
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or "status" not in record:
        return None
    addrs = (record.get("upstream") or "").replace(" : ", ", ").split(", ")
    codes = (record.get("upstream_status") or "").replace(" : ", ", ").split(", ")
    attempts = []
    for i, addr in enumerate(addrs):
        addr = addr.strip()
        if addr and addr != "-" and ":" in addr:
            code = codes[i].strip() if i < len(codes) else ""
            attempts.append((addr, code if code and code != "-" else NONE))
    upstream = _last(record.get("upstream"))
    if ":" not in upstream:  # "" or the group name (no live upstream)
        upstream = ""
    try:
        size = float(record.get("bytes") or 0)
    except ValueError:
        size = 0.0
    return {
        "upstream": upstream,
        "status": str(record.get("status")),
        "request_time": _seconds(record.get("request_time")),
        "header_time": _seconds(record.get("upstream_header_time")),
        "bytes": size,
        "attempts": attempts,
        "key": str(record.get("key") or ""),
        "pool": str(record.get("pool") or ""),
        "prompt_tokens": _tokens(record.get("prompt_tokens")),
        "output_tokens": _tokens(record.get("output_tokens")),
        "tokens_from": str(record.get("tokens_from") or ""),
        "ttft": _seconds(record.get("ttft")),
        "tpot": _seconds(record.get("tpot")),
        "queue_wait": _seconds(record.get("queue_wait")),
    }


def load_config(path):
    config = hs.load_config(path)
    config.setdefault("host", os.uname().nodename)
    config.setdefault("instances", [])
    config.setdefault("listen_address", "127.0.0.1")
    config.setdefault("port", 9855)
    config.setdefault("timeout", 2.0)
    config.setdefault("buckets", list(DEFAULT_BUCKETS))
    config.setdefault("cache_seconds", 0)
    return config


def check_config(config):
    """Raise ValueError on a config the exporter cannot run with; return it otherwise."""
    hs.check_listen(config)
    if float(config.get("cache_seconds", 0)) < 0:
        raise ValueError("cache_seconds must be 0 (no cache) or more")
    buckets = [float(b) for b in config["buckets"]]
    if not buckets or buckets != sorted(set(buckets)) or buckets[0] <= 0:
        raise ValueError("buckets must be positive and strictly increasing")
    for inst in config["instances"]:
        int(inst["id"]), int(inst["port"])
        if not str(inst.get("local_url", "")).startswith("http://"):
            raise ValueError(f"instance {inst['id']}: local_url must be an http:// URL (the plan's local_url)")
        if not isinstance(inst.get("gpu_uuids", []), list):
            raise ValueError(f"instance {inst['id']}: gpu_uuids must be a list")
    gateway = config.get("gateway")
    if gateway is not None and not isinstance(gateway, dict):
        raise ValueError("gateway must be an object or null")
    return config


# ---------------------------------------------------------------------------------------------------------
# Exposition


class Family:
    """One metric family: name, type, help and its samples (suffix, labels, value)."""

    def __init__(self, name, kind, help_text):
        self.name, self.kind, self.help = name, kind, help_text
        self.samples = []

    def add(self, labels, value, suffix=""):
        self.samples.append((suffix, dict(labels), value))
        return self


def render(families):
    out = []
    for fam in families:
        out.append(f"# HELP {fam.name} {fam.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        for suffix, labels, value in fam.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            out.append(
                f"{fam.name}{suffix}{{{text}}} {format_value(value)}"
                if text
                else f"{fam.name}{suffix} {format_value(value)}"
            )
    return "\n".join(out) + "\n"


class Histogram:
    def __init__(self, buckets):
        self.bounds = sorted(float(b) for b in buckets)
        self.counts = [0] * len(self.bounds)
        self.total = 0
        self.sum = 0.0

    def observe(self, value):
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def samples(self, labels):
        acc = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            acc += count
            yield "_bucket", {**labels, "le": format_value(bound)}, acc
        yield "_bucket", {**labels, "le": "+Inf"}, self.total
        yield "_sum", labels, self.sum
        yield "_count", labels, self.total


# ---------------------------------------------------------------------------------------------------------
# Gateway log: tail across rotation, keep counters and histograms per upstream


class LogTailer:
    """Reads the lines appended to a file since the last call; follows rename-rotation and truncation.

    At start the tailer begins at the end of the file (counters start at zero with the process, like every
    Prometheus counter). When the path points to a new file, the rest of the old one is read first.
    """

    def __init__(self, path, from_start=False):
        self.path = path
        self.handle = None
        self.inode = None
        self.partial = b""
        self._open(seek_end=not from_start)

    def _open(self, seek_end):
        try:
            handle = open(self.path, "rb")
        except OSError:
            self.handle, self.inode = None, None
            return
        stat = os.fstat(handle.fileno())
        if seek_end:
            handle.seek(0, os.SEEK_END)
        self.handle, self.inode, self.partial = handle, (stat.st_dev, stat.st_ino), b""

    def _split(self, data, flush=False):
        """Whole lines of partial + data; with flush, also the unterminated rest (the old file is done)."""
        lines = (self.partial + data).split(b"\n")
        self.partial = b"" if flush else lines.pop()
        return [line.decode("utf-8", "replace") for line in lines if line.strip()]

    def read_lines(self, budget=MAX_LOG_READ):
        if self.handle is None:
            self._open(seek_end=False)  # the file appeared after start (or after rotation): read it whole
            if self.handle is None:
                return []
        try:
            stat = os.stat(self.path)
            current = (stat.st_dev, stat.st_ino)
        except OSError:
            stat, current = None, None
        if current == self.inode:
            if stat.st_size < self.handle.tell():  # truncated in place (copytruncate)
                self.handle.seek(0)
                self.partial = b""
            return self._split(self.handle.read(budget))
        # Rotated away (renamed or removed): drain the old file, then go on with the new one from its start.
        lines = self._split(self.handle.read(budget), flush=True)
        self.handle.close()
        self._open(seek_end=False)
        if self.handle is not None:
            lines += self._split(self.handle.read(budget))
        return lines

    def close(self):
        if self.handle is not None:
            self.handle.close()


class GatewayStats:
    def __init__(self, buckets):
        self.buckets = buckets
        self.requests = {}  # (upstream, status) -> count
        self.bytes = {}  # upstream -> bytes
        self.attempts = {}  # (upstream, upstream_status) -> count
        self.duration = {}  # upstream -> Histogram
        self.header = {}  # upstream -> Histogram
        self.lines = {"parsed": 0, "invalid": 0}
        self.tokens = {}  # (key, model, type) -> tokens; type prompt or output
        self.tenant_requests = {}  # (key, model, status) -> count
        self.tenants = set()  # (key, model) pairs seen, at most MAX_TENANT_SERIES
        self.ttft = {}  # model -> Histogram (streamed answers)
        self.tpot = {}  # model -> Histogram (streamed answers that reported their output tokens)
        self.queue_wait = {}  # (key, model) -> Histogram (requests admitted by the pool's queue)

    def add_line(self, line):
        rec = parse_log_line(line)
        if rec is None:
            self.lines["invalid"] += 1
            return
        self.lines["parsed"] += 1
        up = rec["upstream"] or NONE
        self.requests[(up, rec["status"])] = self.requests.get((up, rec["status"]), 0) + 1
        self.bytes[up] = self.bytes.get(up, 0) + rec["bytes"]
        for addr, code in rec["attempts"]:
            self.attempts[(addr, code)] = self.attempts.get((addr, code), 0) + 1
        if rec["request_time"] is not None:
            self.duration.setdefault(up, Histogram(self.buckets)).observe(rec["request_time"])
        if rec["header_time"] is not None and rec["upstream"]:
            self.header.setdefault(up, Histogram(self.buckets)).observe(rec["header_time"])
        self._tenant(rec)

    def _tenant(self, rec):
        """Requests and tokens per API key and model pool (requests that named a model the gateway serves)."""
        model = rec["pool"]
        if not model or model == "*":
            return
        key = rec["key"] or NONE
        if (key, model) not in self.tenants:
            if len(self.tenants) >= MAX_TENANT_SERIES:
                key, model = "other", "other"
            self.tenants.add((key, model))
        self.tenant_requests[(key, model, rec["status"])] = self.tenant_requests.get((key, model, rec["status"]), 0) + 1
        for kind in ("prompt", "output"):
            count = rec[f"{kind}_tokens"]
            if count:
                self.tokens[(key, model, kind)] = self.tokens.get((key, model, kind), 0) + count
        if rec["ttft"] is not None:
            self.ttft.setdefault(model, Histogram(self.buckets)).observe(rec["ttft"])
        if rec["tpot"] is not None:
            self.tpot.setdefault(model, Histogram(TPOT_BUCKETS)).observe(rec["tpot"])
        if rec["queue_wait"] is not None:
            self.queue_wait.setdefault((key, model), Histogram(self.buckets)).observe(rec["queue_wait"])


def load_servers(path):
    """The gateway's record of its upstream servers (role gateway writes it): endpoint -> server."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}
    servers = data.get("servers") if isinstance(data, dict) else None
    return {str(s.get("endpoint")): s for s in servers or [] if isinstance(s, dict) and s.get("endpoint")}


# ---------------------------------------------------------------------------------------------------------
# Collection


def http_get(url, timeout):
    request = urllib.request.Request(url, headers={"User-Agent": "herd-exporter"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return answer.read().decode("utf-8", "replace")


def run_nvidia_smi(binary, timeout):
    env = dict(os.environ, LC_ALL="C")
    result = subprocess.run(
        [binary, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"nvidia-smi exited {result.returncode}: {(result.stdout + result.stderr).strip()[:200]}")
    return result.stdout


class Exporter:
    def __init__(self, config, fetch=http_get, smi=run_nvidia_smi):
        self.config = config
        self.fetch = fetch
        self.smi = smi
        self.lock = threading.Lock()
        gateway = config.get("gateway") or {}
        self.gateway = gateway if gateway.get("enabled", bool(gateway)) else {}
        self.stats = GatewayStats(config.get("buckets") or DEFAULT_BUCKETS)
        self.tailer = LogTailer(self.gateway["access_log"]) if self.gateway.get("access_log") else None
        self._servers_file = self.gateway.get("servers_file")
        self._servers_mtime = None
        self.servers = {}
        # One reading of the instances and one of the GPUs serve every scrape within cache_seconds.
        cache = float(config.get("cache_seconds") or 0)
        self.instance_readings = hs.Cached(self.read_instances, cache)
        self.gpu_readings = hs.Cached(self.read_gpus, cache)
        self.loops = []  # the log poll loop, when running as a service (main)

    # Gateway log polling (also run by a background thread so that rotation between scrapes is not missed).
    def poll_log(self):
        if self.tailer is None:
            return True
        with self.lock:
            try:
                for line in self.tailer.read_lines():
                    self.stats.add_line(line)
            except OSError:
                return False
        return self.tailer.handle is not None

    def _refresh_servers(self):
        if not self._servers_file:
            return
        try:
            mtime = os.stat(self._servers_file).st_mtime_ns
        except OSError:
            self.servers, self._servers_mtime = {}, None
            return
        if mtime != self._servers_mtime:
            self.servers, self._servers_mtime = load_servers(self._servers_file), mtime

    def _upstream_labels(self, upstream):
        server = self.servers.get(upstream, {})
        port = upstream.rsplit(":", 1)[1] if ":" in upstream else ""
        return {
            "host": self.config["host"],
            "upstream": upstream,
            "backend_host": str(server.get("host", "")),
            "instance_id": str(server.get("id", "")),
            "port": port,
        }

    def read_instances(self):
        """[(instance, models or None when it did not answer, seconds the probe took)] of every planned instance."""
        timeout = float(self.config.get("timeout") or 2.0)
        readings = []
        for inst in self.config.get("instances") or []:
            url = str(inst["local_url"]).rstrip("/") + "/api/ps"  # the plan's local_url (role ollama)
            t0 = time.monotonic()
            try:
                models = parse_ps(self.fetch(url, timeout))
            except (OSError, ValueError, urllib.error.URLError):
                models = None
            readings.append((inst, models, time.monotonic() - t0))
        return readings

    def read_gpus(self):
        """The GPUs' rows from nvidia-smi, or None when it failed."""
        try:
            return parse_nvidia_smi(self.smi(self.config["nvidia_smi"], float(self.config.get("timeout") or 2.0)))
        except (OSError, ValueError, RuntimeError, subprocess.SubprocessError):
            return None

    def collect(self):
        started = time.monotonic()
        host = self.config["host"]
        timeout = float(self.config.get("timeout") or 2.0)
        fams = {}

        def fam(name, kind, help_text):
            if name not in fams:
                fams[name] = Family(name, kind, help_text)
            return fams[name]

        collector_ok = fam("herd_exporter_collector_success", "gauge", "1 when the collector's last run succeeded")

        # Instances of the plan.
        instances = self.config.get("instances") or []
        uuid_owner = {}
        if instances:
            ok = True
            for inst, models, elapsed in self.instance_readings.get():
                uuids = [str(u) for u in inst.get("gpu_uuids") or []]
                for uuid in uuids:
                    uuid_owner[uuid] = str(inst["id"])
                labels = {
                    "host": host,
                    "instance_id": str(inst["id"]),
                    "port": str(inst["port"]),
                    "gpu_uuid": ",".join(uuids),
                }
                up = int(models is not None)
                ok = ok and bool(up)
                models = models or []
                fam("herd_instance_up", "gauge", "1 when the Ollama instance answered /api/ps").add(labels, up)
                fam("herd_instance_probe_duration_seconds", "gauge", "Time the instance took to answer /api/ps").add(
                    labels, elapsed
                )
                fam("herd_instance_num_parallel", "gauge", "Requests the instance serves at once (plan)").add(
                    labels, int(inst.get("num_parallel") or 0)
                )
                fam("herd_instance_max_queue", "gauge", "Requests the instance queues beyond num_parallel (plan)").add(
                    labels, int(inst.get("max_queue") or 0)
                )
                fam("herd_instance_models_loaded", "gauge", "Models loaded in the instance (/api/ps)").add(
                    labels, len(models)
                )
                for model in models:
                    mlabels = {**labels, "model": model["name"]}
                    fam("herd_instance_model_size_bytes", "gauge", "Memory of a loaded model (/api/ps size)").add(
                        mlabels, model["size"]
                    )
                    fam(
                        "herd_instance_model_vram_bytes", "gauge", "GPU memory of a loaded model (/api/ps size_vram)"
                    ).add(mlabels, model["size_vram"])
            collector_ok.add({"host": host, "collector": "instances"}, 1 if ok else 0)

        # GPUs.
        if self.config.get("nvidia_smi"):
            gpus = self.gpu_readings.get()
            ok = int(gpus is not None)
            gpus = gpus or []
            collector_ok.add({"host": host, "collector": "gpu"}, ok)
            for gpu in gpus:
                labels = {
                    "host": host,
                    "gpu": str(gpu["index"]),
                    "gpu_uuid": gpu["uuid"],
                    "instance_id": uuid_owner.get(gpu["uuid"], ""),
                }
                if gpu["utilization_percent"] is not None:
                    fam(
                        "herd_gpu_utilization_percent",
                        "gauge",
                        "GPU utilisation over the last sample period (nvidia-smi)",
                    ).add(labels, gpu["utilization_percent"])
                if gpu["memory_used_mib"] is not None:
                    fam("herd_gpu_memory_used_bytes", "gauge", "GPU memory in use (nvidia-smi)").add(
                        labels, gpu["memory_used_mib"] * MIB
                    )
                if gpu["memory_total_mib"] is not None:
                    fam("herd_gpu_memory_total_bytes", "gauge", "GPU memory in total (nvidia-smi)").add(
                        labels, gpu["memory_total_mib"] * MIB
                    )

        # Gateway.
        if self.gateway:
            self._gateway(fam, collector_ok, timeout)

        for name, cached, used in (("instances", self.instance_readings, instances),
                                   ("gpu", self.gpu_readings, self.config.get("nvidia_smi"))):
            if used:
                fam("herd_exporter_readings_total", "counter",
                    "Readings taken of the instances (/api/ps) and GPUs (nvidia-smi); scrapes within cache_seconds "
                    "share one").add({"host": host, "reading": name}, cached.reads)
        if self.loops:
            up = fam("herd_exporter_loop_up", "gauge", "1 while the loop runs and its current round is within its limit")
            errors = fam("herd_exporter_round_errors_total", "counter", "Rounds of the loop that raised (it went on)")
            for loop in self.loops:
                up.add({"host": host, "loop": loop.name}, int(loop.live()))
                errors.add({"host": host, "loop": loop.name}, loop.errors)
        fam("herd_exporter_scrape_duration_seconds", "gauge", "Time this scrape took").add(
            {"host": host}, time.monotonic() - started
        )
        return list(fams.values())

    def _gateway(self, fam, collector_ok, timeout):
        host = self.config["host"]
        if self.tailer is not None:
            collector_ok.add({"host": host, "collector": "gateway_log"}, 1 if self.poll_log() else 0)
        with self.lock:
            self._refresh_servers()
            stats = self.stats
            req = fam(
                "herd_gateway_requests_total",
                "counter",
                "Requests answered by the gateway, by final upstream and status",
            )
            for (up, status), count in sorted(stats.requests.items()):
                req.add({**self._upstream_labels(up), "status": status}, count)
            byt = fam("herd_gateway_response_bytes_total", "counter", "Body bytes sent to clients, by final upstream")
            for up, count in sorted(stats.bytes.items()):
                byt.add(self._upstream_labels(up), count)
            att = fam(
                "herd_gateway_upstream_attempts_total",
                "counter",
                "Tries of an instance (retries included), by its status",
            )
            for (up, code), count in sorted(stats.attempts.items()):
                att.add({**self._upstream_labels(up), "upstream_status": code}, count)
            for name, source, help_text in (
                (
                    "herd_gateway_request_duration_seconds",
                    stats.duration,
                    "Time from the request's first byte to the answer's last (request_time)",
                ),
                (
                    "herd_gateway_upstream_header_duration_seconds",
                    stats.header,
                    "Time until the instance's answer headers (upstream_header_time), the time to first token when streaming",
                ),
            ):
                hist = fam(name, "histogram", help_text)
                for up, histogram in sorted(source.items()):
                    for suffix, labels, value in histogram.samples(self._upstream_labels(up)):
                        hist.add(labels, value, suffix)
            tokens = fam("herd_gateway_tokens_total", "counter",
                         "Tokens of the answers by API key and model (type prompt or output), as the instances reported "
                         "them, or the records delivered of a cut stream")
            for (key, model, kind), count in sorted(stats.tokens.items()):
                tokens.add({"host": host, "key": key, "model": model, "type": kind}, count)
            tenant = fam("herd_gateway_key_requests_total", "counter",
                         "Requests that named a model the gateway serves, by API key, model and status")
            for (key, model, code), count in sorted(stats.tenant_requests.items()):
                tenant.add({"host": host, "key": key, "model": model, "status": code}, count)
            for name, source, help_text in (
                ("herd_gateway_time_to_first_token_seconds", stats.ttft,
                 "Time from the request's arrival to the first byte of its streamed answer (queue wait included)"),
                ("herd_gateway_time_per_output_token_seconds", stats.tpot,
                 "Time between the first and the last record of a streamed answer per further output token"),
            ):
                hist = fam(name, "histogram", help_text)
                for model, histogram in sorted(source.items()):
                    for suffix, labels, value in histogram.samples({"host": host, "model": model}):
                        hist.add(labels, value, suffix)
            wait = fam("herd_gateway_key_queue_wait_seconds", "histogram",
                       "Time a request waited in its pool's queue for its key's turn and a free slot, by API key and model")
            for (key, model), histogram in sorted(stats.queue_wait.items()):
                for suffix, labels, value in histogram.samples({"host": host, "key": key, "model": model}):
                    wait.add(labels, value, suffix)
            lines = fam("herd_gateway_log_lines_total", "counter", "Access log lines read, by result")
            for result, count in sorted(stats.lines.items()):
                lines.add({"host": host, "result": result}, count)
            servers = list(self.servers.values())

        labels = {"host": host}
        if servers:
            fam(
                "herd_gateway_capacity_requests",
                "gauge",
                "Requests the gateway's instances serve at once (sum of num_parallel)",
            ).add(labels, sum(int(s.get("num_parallel") or 0) for s in servers))
            fam(
                "herd_gateway_admission_limit",
                "gauge",
                "Requests the gateway admits before answering busy (sum of max_conns)",
            ).add(labels, sum(int(s.get("max_conns") or 0) for s in servers))
        self._pools(fam, collector_ok, timeout)
        url = self.gateway.get("status_url")
        if not url:
            return
        try:
            status = parse_stub_status(self.fetch(url, timeout))
        except (OSError, ValueError, urllib.error.URLError):
            collector_ok.add({"host": host, "collector": "gateway_status"}, 0)
            return
        collector_ok.add({"host": host, "collector": "gateway_status"}, 1)
        # The stub_status request of this scrape is itself one request being written.
        in_flight = max(0, status["reading"] + status["writing"] - 1)
        fam(
            "herd_gateway_connections_active", "gauge", "Open client connections, idle ones included (stub_status)"
        ).add(labels, status["active"])
        fam("herd_gateway_connections_waiting", "gauge", "Idle keepalive client connections (stub_status)").add(
            labels, status["waiting"]
        )
        fam("herd_gateway_connections_accepted_total", "counter", "Client connections accepted (stub_status)").add(
            labels, status["accepts"]
        )
        fam(
            "herd_gateway_http_requests_total",
            "counter",
            "Client requests of every nginx server, this scrape's included (stub_status)",
        ).add(labels, status["requests"])
        fam(
            "herd_gateway_requests_in_flight",
            "gauge",
            "Requests being read or answered now, this scrape excluded (stub_status)",
        ).add(labels, in_flight)
        if servers:
            capacity = sum(int(s.get("num_parallel") or 0) for s in servers)
            fam(
                "herd_gateway_requests_queued_estimate",
                "gauge",
                "Requests in flight beyond the instances' num_parallel: waiting in Ollama queues",
            ).add(labels, max(0, in_flight - capacity))


    def _pools(self, fam, collector_ok, timeout):
        """Per model pool: the gateway's wait queue (GET /herd/pools on loopback)."""
        url = self.gateway.get("pools_url")
        if not url:
            return
        host = self.config["host"]
        available = fam(
            "herd_gateway_pools_available",
            "gauge",
            "1 when the gateway answers /herd/pools (0: a gateway without model pools, 404, or no answer)",
        )
        try:
            text = self.fetch(url, timeout)
            pools = parse_pools(text)
            memory = parse_gateway_memory(text)
        except urllib.error.HTTPError as exc:
            # 404: a gateway from before the wait queue; nothing to publish, and nothing failed.
            collector_ok.add({"host": host, "collector": "gateway_pools"}, 1 if exc.code == 404 else 0)
            available.add({"host": host}, 0)
            return
        except (OSError, ValueError, urllib.error.URLError):
            collector_ok.add({"host": host, "collector": "gateway_pools"}, 0)
            available.add({"host": host}, 0)
            return
        collector_ok.add({"host": host, "collector": "gateway_pools"}, 1)
        available.add({"host": host}, 1)
        if memory["dicts"]:
            capacity = fam("herd_gateway_shared_dict_capacity_bytes", "gauge",
                           "Size of a shared dict of the gateway (lua_shared_dict)")
            free = fam("herd_gateway_shared_dict_free_bytes", "gauge",
                       "Free pages of a shared dict of the gateway, in bytes (0: new keys need evictions or fail)")
            for entry in memory["dicts"]:
                capacity.add({"host": host, "dict": entry["name"]}, entry["capacity"])
                free.add({"host": host, "dict": entry["name"]}, entry["free_space"])
        if memory["body_held"] is not None:
            fam("herd_gateway_body_held_bytes", "gauge",
                "Request body bytes the gateway holds in memory now (at most gateway_body_memory)").add(
                {"host": host}, memory["body_held"])
        if not pools:
            return
        depth = fam("herd_gateway_pool_queue_depth", "gauge", "Requests waiting in the pool's queue now")
        qmax = fam("herd_gateway_pool_queue_max", "gauge", "Requests the pool's queue holds at most (gateway_queue_max)")
        admitted = fam("herd_gateway_pool_admitted_total", "counter", "Requests of the pool sent to an instance")
        rejected = fam(
            "herd_gateway_pool_rejected_total",
            "counter",
            "Requests of the pool answered busy, by reason (full: queue at its max, timeout: waited too long)",
        )
        abandoned = fam("herd_gateway_pool_abandoned_total", "counter", "Clients that hung up while queued")
        wait = fam("herd_gateway_pool_wait_seconds", "histogram", "Time requests of the pool waited in its queue")
        inflight = fam(
            "herd_gateway_pool_instance_inflight",
            "gauge",
            "Requests in flight on an instance of the pool (all pools of the instance together)",
        )
        conns = fam("herd_gateway_pool_instance_max_conns", "gauge", "Requests an instance of the pool takes at once")
        down = fam("herd_gateway_pool_instance_down", "gauge", "1 when the instance is drained or failed")
        affinity = fam(
            "herd_gateway_pool_affinity_total",
            "counter",
            "Requests of the pool with cache affinity, by result (hit: sent to an instance that served part of its "
            "prompt or its session before; miss: those instances had no free slot, were too loaded or down; new: "
            "nothing of it cached anywhere)",
        )
        prefix = fam(
            "herd_gateway_pool_prefix_hit_bytes",
            "histogram",
            "Prompt bytes of a request that the instance it was sent to had served before (its prompt cache; 0: a "
            "miss), per request with cache affinity",
        )
        waits = fam(
            "herd_gateway_pool_prefix_waits_total",
            "counter",
            "Requests of the pool that waited for another request evaluating their prompt's prefix cold to end, "
            "to take the slot that then holds it (a burst of one agent's new sessions)",
        )
        for pool in pools:
            labels = {"host": host, "pool": pool["name"]}
            depth.add(labels, pool["queued"])
            qmax.add(labels, pool["queue_max"])
            admitted.add(labels, pool["admitted"])
            rejected.add({**labels, "reason": "full"}, pool["rejected_full"])
            rejected.add({**labels, "reason": "timeout"}, pool["rejected_timeout"])
            abandoned.add(labels, pool["abandoned"])
            for bound, value in pool["wait"]["buckets"]:
                wait.add({**labels, "le": format_value(bound)}, value, "_bucket")
            wait.add(labels, pool["wait"]["sum"], "_sum")
            wait.add(labels, pool["wait"]["count"], "_count")
            for inst in pool["instances"]:
                ilabels = {**labels, "server": inst["key"], "endpoint": inst["endpoint"]}
                inflight.add(ilabels, inst["inflight"])
                conns.add(ilabels, inst["max_conns"])
                down.add(ilabels, 1 if inst["down"] else 0)
            for result, value in (pool["affinity"] or {}).items():
                affinity.add({**labels, "result": result}, value)
            if pool["prefix_waits"] is not None:
                waits.add(labels, pool["prefix_waits"])
            if pool["prefix"] is not None:
                for bound, value in pool["prefix"]["buckets"]:
                    prefix.add({**labels, "le": format_value(bound)}, value, "_bucket")
                prefix.add(labels, pool["prefix"]["sum"], "_sum")
                prefix.add(labels, pool["prefix"]["count"], "_count")


# ---------------------------------------------------------------------------------------------------------
# HTTP server


def serve(exporter, config):
    """The /metrics server (herd_service.metrics_server)."""
    return hs.metrics_server(config, lambda: render(exporter.collect()), "herd-exporter")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prometheus exporter for a herd host")
    parser.add_argument("--config", default="/etc/herd/exporter.json")
    parser.add_argument("--once", action="store_true", help="print one scrape on stdout and exit")
    parser.add_argument("--check", action="store_true", help="only check the config file and exit")
    args = parser.parse_args(argv)
    config = hs.read_config(args.config, check_config, "herd-exporter", load=load_config)
    if config is None:
        return 2
    if args.check:
        return 0
    exporter = Exporter(config)
    if args.once:
        sys.stdout.write(render(exporter.collect()))
        return 0
    stop = threading.Event()
    interval = float(config.get("log_poll_interval") or 1.0)
    server = serve(exporter, config)
    # The log poll loop: a round reads at most MAX_LOG_READ; stuck when one takes a minute.
    exporter.loops.append(hs.Loop("log_poll", exporter.poll_log, interval, interval + 60, stop, "herd-exporter"))
    exporter.loops[0].start()
    hs.Watchdog(lambda: all(loop.live() for loop in exporter.loops), stop, service="herd-exporter").start()
    print(f"herd exporter listening on {config['listen_address']}:{config['port']}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
