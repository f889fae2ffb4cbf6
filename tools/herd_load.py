#!/usr/bin/env python3
"""herd_load: a bounded load generator for Ollama-compatible endpoints.

Measures what matters when serving LLMs: requests/s, output tokens/s, time to
first token (TTFT) and total latency percentiles, errors by HTTP status, and
the spread of requests across the instances behind herd's gateway (read from
the ``X-Herd-Upstream`` response header; ``unknown`` when absent).

Standard library only (Python 3.8+), so it runs on any host with python3.
Matplotlib is used for ``--plot`` only when it can be imported.

Examples::

    # closed loop: 16 clients, at most 400 requests or 60 s, streamed /api/generate
    python3 tools/herd_load.py --url http://127.0.0.1:8080 --api generate \\
        --model qwen2.5:7b --concurrency 16 --requests 400 --duration 60 \\
        --json out.json --markdown out.md --plot out.png

    # open loop: Poisson arrivals at 5 req/s, mixed prompt/answer lengths, OpenAI API
    python3 tools/herd_load.py --url http://10.0.0.5 --api openai --model m \\
        --rate 5 --prompt-mix mixed --requests 300 --duration 120

Targets: by default only loopback (127.0.0.0/8, ::1) and private networks
(10/8, 172.16/12, 192.168/16, fc00::/7) are accepted, after DNS resolution.
A load generator aimed at the wrong address is a denial of service on
someone else's machine; herd clusters and labs live on private networks, so
anything else needs the explicit ``--allow-remote`` to say "this public
address is mine and I mean to load it".

Every run is bounded: ``--requests`` and ``--duration`` (hard caps below),
plus a per-request ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import random
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

VERSION = "1.0"
UPSTREAM_HEADER = "x-herd-upstream"
UNKNOWN_UPSTREAM = "unknown"
MAX_REQUESTS = 100_000
MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 4096
MAX_ERROR_BODY = 65536
PERCENTILES = (50, 90, 95, 99)

API_PATHS = {
    "generate": "/api/generate",
    "chat": "/api/chat",
    "openai": "/v1/chat/completions",
}

# name -> "CLASS:PROMPT_WORDS:MAX_TOKENS:WEIGHT,..."
MIX_PRESETS = {
    "short": "short:32:64:1",
    "long": "long:512:512:1",
    "mixed": "short:32:32:4,long:256:256:1",
}

ALLOWED_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "::1/128",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    )
)

WORDS = (
    "gpu", "herd", "token", "model", "batch", "queue", "nginx", "stream",
    "latency", "cluster", "server", "prompt", "answer", "kernel", "memory",
    "cache",
)


# ---------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class MixClass:
    """One kind of request in a prompt mix."""

    name: str
    prompt_words: int
    max_tokens: int
    weight: float


@dataclass
class Record:
    """What one request did."""

    index: int
    cls: str
    start: float  # seconds since the run started
    status: int = 0  # HTTP status, 0 when no response arrived
    ok: bool = False
    ttft: float | None = None  # seconds to the first content token (streaming only)
    latency: float | None = None  # seconds to the end of the answer
    tokens: int = 0  # output tokens (server count when reported, else content chunks)
    upstream: str = UNKNOWN_UPSTREAM
    error: str | None = None  # error key: "http_503", "timeout", "connect", ...
    detail: str = ""
    stale_retries: int = 0  # resent once because a reused keep-alive connection was closed before a response


@dataclass
class Event:
    """What one line (or whole non-streamed body) of an answer carried."""

    text: str = ""
    done: bool = False
    tokens: int | None = None
    error: str | None = None


@dataclass
class Config:
    url: str
    api: str = "generate"
    model: str = "llama3.2:1b"
    concurrency: int | None = None
    rate: float | None = None
    arrival: str = "poisson"
    max_inflight: int = 1024
    requests: int = 100
    duration: float = 60.0
    stream: bool = True
    mix: list[MixClass] = field(default_factory=list)
    seed: int = 1
    timeout: float = 600.0
    api_key: str | None = None
    insecure: bool = False
    allow_remote: bool = False
    progress: float = 1.0
    keep_samples: bool = True


def percentile(values: Sequence[float], q: float) -> float | None:
    """Percentile with linear interpolation between closest ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q!r}")
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(data[lo])
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def distribution(values: Iterable[float | None]) -> dict[str, float | None]:
    """min/mean/p50/p90/p95/p99/max of the values that are not None."""
    data = [float(v) for v in values if v is not None]
    out: dict[str, float | None] = {"count": len(data)}
    if not data:
        out.update({"min": None, "mean": None, "max": None})
        out.update({f"p{p}": None for p in PERCENTILES})
        return out
    out["min"] = min(data)
    out["mean"] = sum(data) / len(data)
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(data, p)
    out["max"] = max(data)
    return out


def parse_mix(spec: str) -> list[MixClass]:
    """Parse ``NAME:PROMPT_WORDS:MAX_TOKENS[:WEIGHT],...`` or a preset name."""
    spec = MIX_PRESETS.get(spec, spec)
    classes = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(
                "prompt mix entry {!r}: want NAME:PROMPT_WORDS:MAX_TOKENS[:WEIGHT] or one of {}".format(item, ", ".join(sorted(MIX_PRESETS)))
            )
        name = parts[0]
        try:
            words, tokens = int(parts[1]), int(parts[2])
            weight = float(parts[3]) if len(parts) == 4 else 1.0
        except ValueError:
            raise ValueError(f"prompt mix entry {item!r}: numbers expected") from None
        if not name or words < 1 or tokens < 1 or weight <= 0:
            raise ValueError(f"prompt mix entry {item!r}: name, words >= 1, tokens >= 1, weight > 0")
        classes.append(MixClass(name, words, tokens, weight))
    if not classes:
        raise ValueError("empty prompt mix")
    if len({c.name for c in classes}) != len(classes):
        raise ValueError("prompt mix class names must be unique")
    return classes


def pick_class(mix: Sequence[MixClass], rng: random.Random) -> MixClass:
    return rng.choices(list(mix), weights=[c.weight for c in mix], k=1)[0]


def make_prompt(words: int, index: int) -> str:
    """A deterministic prompt of ``words`` words, unique per request index."""
    body = [WORDS[(index + i) % len(WORDS)] for i in range(max(words - 1, 0))]
    return " ".join([f"request-{index}"] + body)


def build_body(api: str, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    """JSON body for one request to ``API_PATHS[api]``."""
    if api == "generate":
        return {"model": model, "prompt": prompt, "stream": stream, "options": {"num_predict": max_tokens}}
    messages = [{"role": "user", "content": prompt}]
    if api == "chat":
        return {"model": model, "messages": messages, "stream": stream, "options": {"num_predict": max_tokens}}
    if api == "openai":
        body = {"model": model, "messages": messages, "stream": stream, "max_tokens": max_tokens}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body
    raise ValueError("unknown api {!r} (want one of {})".format(api, ", ".join(API_PATHS)))


def parse_event(api: str, line: str) -> Event | None:
    """Parse one NDJSON/SSE line (or a whole non-streamed body). None for blank/comment lines."""
    line = line.strip()
    if not line or line.startswith(":"):
        return None
    if api == "openai" and line.startswith("data:"):
        line = line[5:].strip()
        if line == "[DONE]":
            return Event(done=True)
    elif api == "openai" and line.startswith(("event:", "id:", "retry:")):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return Event(error="bad_json")
    if not isinstance(obj, dict):
        return Event(error="bad_json")
    if obj.get("error"):
        err = obj["error"]
        return Event(error=str(err.get("message", err)) if isinstance(err, dict) else str(err))
    if api == "generate":
        return Event(
            text=obj.get("response") or "",
            done=bool(obj.get("done")),
            tokens=obj.get("eval_count") if obj.get("done") else None,
        )
    if api == "chat":
        msg = obj.get("message") or {}
        return Event(
            text=msg.get("content") or "",
            done=bool(obj.get("done")),
            tokens=obj.get("eval_count") if obj.get("done") else None,
        )
    # openai: a chunk (delta) or a whole completion (message)
    text = ""
    for choice in obj.get("choices") or []:
        part = choice.get("delta") or choice.get("message") or {}
        text += part.get("content") or ""
    usage = obj.get("usage") or {}
    return Event(text=text, done=obj.get("object") == "chat.completion", tokens=usage.get("completion_tokens"))


def target_allowed(host: str, addresses: Sequence[str], allow_remote: bool) -> tuple[bool, str]:
    """Whether every resolved address of ``host`` is loopback or private lab space."""
    if allow_remote:
        return True, "remote targets allowed by --allow-remote"
    if not addresses:
        return False, f"{host} does not resolve"
    for addr in addresses:
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            return False, f"{host} resolves to {addr!r}, not an IP address"
        if getattr(ip, "ipv4_mapped", None):
            ip = ip.ipv4_mapped
        if not any(ip in net for net in ALLOWED_NETWORKS):
            return False, (
                f"{host} resolves to {ip}, outside loopback and private networks; "
                "pass --allow-remote if this cluster is yours"
            )
    return True, "loopback/private target"


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return sorted({info[4][0] for info in infos})


def summarize(records: Sequence[Record], wall: float) -> dict:
    """Aggregate request records into the report's numbers."""
    ok = [r for r in records if r.ok]
    wall = max(wall, 1e-9)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = r.error or f"http_{r.status}"
            errors[key] = errors.get(key, 0) + 1
    tokens = sum(r.tokens for r in ok)
    summary = {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "errors_by_status": dict(sorted(errors.items())),
        "stale_keepalive_retries": sum(r.stale_retries for r in records),
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "ttft_s": distribution(r.ttft for r in ok),
        "latency_s": distribution(r.latency for r in ok),
        "tokens_per_request": distribution(r.tokens for r in ok),
    }
    by_class: dict[str, dict] = {}
    for name in sorted({r.cls for r in records}):
        rs = [r for r in records if r.cls == name]
        good = [r for r in rs if r.ok]
        by_class[name] = {
            "requests": len(rs),
            "ok": len(good),
            "output_tokens": sum(r.tokens for r in good),
            "ttft_s": distribution(r.ttft for r in good),
            "latency_s": distribution(r.latency for r in good),
        }
    by_upstream: dict[str, dict] = {}
    for name in sorted({r.upstream for r in ok}):
        rs = [r for r in ok if r.upstream == name]
        by_upstream[name] = {
            "requests": len(rs),
            "share": len(rs) / len(ok),
            "output_tokens": sum(r.tokens for r in rs),
            "latency_p50_s": percentile([r.latency for r in rs], 50),
            "latency_p99_s": percentile([r.latency for r in rs], 99),
        }
    counts = [u["requests"] for u in by_upstream.values()]
    spread = {
        "instances": len(counts),
        "min_requests": min(counts) if counts else 0,
        "max_requests": max(counts) if counts else 0,
        "max_over_min": (max(counts) / min(counts)) if counts and min(counts) else None,
    }
    if len(counts) > 1:
        mean = sum(counts) / len(counts)
        var = sum((c - mean) ** 2 for c in counts) / len(counts)
        spread["cv"] = math.sqrt(var) / mean
    else:
        spread["cv"] = 0.0 if counts else None
    return {"summary": summary, "by_class": by_class, "by_upstream": by_upstream, "spread": spread}


def _fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    if v is None:
        return "-"
    return ("%." + str(digits) + "f") % (v * scale)


def render_markdown(result: dict) -> str:
    """A markdown report of one run (the result of ``run``/``build_result``)."""
    cfg = result["config"]
    s = result["summary"]
    mode = "concurrency {}".format(cfg["concurrency"]) if cfg.get("concurrency") else "rate {} req/s ({})".format(
        cfg["rate"], cfg["arrival"])
    lines = [
        "### herd_load: {} {}, model `{}`, {}, {}".format(
            cfg["api"], cfg["url"], cfg["model"], mode, "streaming" if cfg["stream"] else "not streaming"),
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests (ok / total) | {s['ok']} / {s['requests']} |",
        "| wall time | {:.2f} s |".format(s["wall_s"]),
        "| throughput | {:.2f} req/s |".format(s["req_per_s"]),
        f"| output tokens | {s['output_tokens']} ({s['output_tokens_per_s']:.1f} tok/s) |",
    ]
    for key, label in (("ttft_s", "TTFT"), ("latency_s", "latency")):
        d = s[key]
        lines.append("| {} p50 / p95 / p99 | {} / {} / {} s |".format(label, _fmt(d["p50"]), _fmt(d["p95"]), _fmt(d["p99"])))
    errs = ", ".join(f"{k}: {v}" for k, v in s["errors_by_status"].items()) or "none"
    lines.append(f"| errors | {errs} |")
    if len(result["by_class"]) > 1:
        lines += ["", "| class | ok | TTFT p50 | latency p50 | latency p99 |", "|---|---|---|---|---|"]
        for name, c in result["by_class"].items():
            cells = [name, str(c["ok"]), _fmt(c["ttft_s"]["p50"]), _fmt(c["latency_s"]["p50"]),
                     _fmt(c["latency_s"]["p99"])]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| instance | requests | share | output tokens | latency p50 | latency p99 |",
              "|---|---|---|---|---|---|"]
    for name, u in result["by_upstream"].items():
        cells = [name, str(u["requests"]), f"{100 * u['share']:.1f}%", str(u["output_tokens"]),
                 _fmt(u["latency_p50_s"]), _fmt(u["latency_p99_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    sp = result["spread"]
    lines.append("")
    lines.append(
        f"Spread over {sp['instances']} instance(s): max/min requests {_fmt(sp['max_over_min'], digits=2)}, "
        f"coefficient of variation {_fmt(sp['cv'], digits=3)}."
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> bool:
    """Write a PNG (latency/TTFT distribution, per-instance spread). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = [r for r in result.get("samples", []) if r["ok"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("latency", "total latency"), ("ttft", "TTFT")):
        vals = sorted(r[key] for r in samples if r[key] is not None)
        if vals:
            ax1.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=label)
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("latency distribution (CDF)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    names = list(result["by_upstream"])
    ax2.bar(range(len(names)), [result["by_upstream"][n]["requests"] for n in names])
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("requests served")
    ax2.set_title("per-instance spread")
    fig.suptitle("{} {} ({})".format(result["config"]["api"], result["config"]["url"], result["started_at"]))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- HTTP client


class HTTPError(Exception):
    pass


class Target:
    """Where requests go, plus a small pool of idle keep-alive connections."""

    def __init__(self, url: str, insecure: bool = False):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must look like http://HOST[:PORT], got {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        default_port = 443 if parts.scheme == "https" else 80
        host_hdr = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host_hdr if self.port == default_port else f"{host_hdr}:{self.port}"
        self.ssl: ssl.SSLContext | None = None
        if self.scheme == "https":
            self.ssl = ssl.create_default_context()
            if insecure:
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def acquire(self):
        conn, _reused = await self.acquire_tracked()
        return conn

    async def acquire_tracked(self):
        """A connection and whether it is an idle keep-alive one (the server may have closed it meanwhile)."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return (reader, writer), True
            writer.close()
        return await asyncio.open_connection(self.host, self.port, ssl=self.ssl), False

    def release(self, conn, reusable: bool) -> None:
        reader, writer = conn
        if reusable and not reader.at_eof():
            self._idle.append(conn)
        else:
            writer.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    line = await reader.readline()
    if not line:
        raise HTTPError("connection closed before a response")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HTTPError(f"bad status line {line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        k = k.strip().lower()
        v = v.strip()
        headers[k] = headers[k] + ", " + v if k in headers and k != UPSTREAM_HEADER else v
    return int(parts[1]), parts[0], headers


async def _iter_body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield body pieces as they arrive (chunked, content-length or until EOF)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise HTTPError("connection closed inside a chunked body")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining > 0:
            data = await reader.read(min(remaining, 65536))
            if not data:
                raise HTTPError("connection closed inside the body")
            remaining -= len(data)
            yield data
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def one_request(target: Target, cfg: Config, rec: Record, body: bytes, t0: float) -> None:
    """Send one request, fill ``rec``. Raises on transport errors (caller records them)."""
    path = target.base_path + API_PATHS[cfg.api]
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {target.host_header}",
        f"User-Agent: herd_load/{VERSION}",
        "Content-Type: application/json",
        "Accept: application/x-ndjson, text/event-stream, application/json",
        f"Content-Length: {len(body)}",
    ]
    if cfg.api_key:
        head.append(f"Authorization: Bearer {cfg.api_key}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    # Like Go's and curl's HTTP clients, resend once on a fresh connection when a reused keep-alive connection
    # was closed by the server before any byte of a response (nginx closes idle client connections when it
    # reloads); such a request never reached the server. Counted in rec.stale_retries.
    while True:
        conn, reused = await target.acquire_tracked()
        reader, writer = conn
        try:
            writer.write(raw)
            await writer.drain()
            status, version, headers = await _read_head(reader)
            break
        except (ConnectionError, HTTPError) as exc:
            writer.close()
            if reused and rec.stale_retries == 0 and (
                isinstance(exc, ConnectionError) or str(exc) == "connection closed before a response"
            ):
                rec.stale_retries += 1
                continue
            raise
    reusable = False
    try:
        rec.status = status
        rec.upstream = headers.get(UPSTREAM_HEADER) or UNKNOWN_UPSTREAM
        framed = "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" in headers
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if not 200 <= status < 300:
            data = b""
            async for piece in _iter_body(reader, headers):
                if len(data) < MAX_ERROR_BODY:
                    data += piece
            rec.error = f"http_{status}"
            rec.detail = data[:300].decode("utf-8", "replace")
            rec.latency = time.perf_counter() - t0 - rec.start
            reusable = keep and framed
            return
        buf = b""
        chunks = 0
        reported: int | None = None
        done = False
        events: list[Event] = []
        async for piece in _iter_body(reader, headers):
            if not cfg.stream:
                buf += piece
                continue
            buf += piece
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                ev = parse_event(cfg.api, line.decode("utf-8", "replace"))
                if ev is not None:
                    events.append(ev)
            for ev in events:
                if ev.error:
                    rec.error, rec.detail = "stream_error", ev.error[:300]
                if ev.text:
                    chunks += 1
                    if rec.ttft is None:
                        rec.ttft = time.perf_counter() - t0 - rec.start
                if ev.tokens is not None:
                    reported = ev.tokens
                done = done or ev.done
            events.clear()
        if buf.strip():
            ev = parse_event(cfg.api, buf.decode("utf-8", "replace"))
            if ev is not None:
                if ev.error:
                    rec.error, rec.detail = "stream_error" if cfg.stream else "body_error", ev.error[:300]
                if ev.text:
                    chunks += 1
                if ev.tokens is not None:
                    reported = ev.tokens
                done = done or ev.done or not cfg.stream
        rec.latency = time.perf_counter() - t0 - rec.start
        rec.tokens = reported if reported is not None else chunks
        if rec.error is None and not done:
            rec.error = "incomplete"
        rec.ok = rec.error is None
        reusable = keep and framed
    finally:
        target.release(conn, reusable)


# ---------------------------------------------------------------- the run


class Runner:
    def __init__(self, cfg: Config, target: Target, out=sys.stderr):
        self.cfg = cfg
        self.target = target
        self.out = out
        self.rng = random.Random(cfg.seed)
        self.records: list[Record] = []
        self.issued = 0
        self.inflight = 0
        self.t0 = 0.0
        self.stop_at = 0.0

    def _next(self) -> Record | None:
        now = time.perf_counter()
        if self.issued >= self.cfg.requests or now >= self.stop_at:
            return None
        cls = pick_class(self.cfg.mix, self.rng)
        rec = Record(index=self.issued, cls=cls.name, start=now - self.t0)
        self.issued += 1
        self.records.append(rec)
        return rec

    async def _execute(self, rec: Record) -> None:
        cls = next(c for c in self.cfg.mix if c.name == rec.cls)
        body = json.dumps(build_body(self.cfg.api, self.cfg.model, make_prompt(cls.prompt_words, rec.index),
                                     cls.max_tokens, self.cfg.stream)).encode()
        self.inflight += 1
        try:
            await asyncio.wait_for(one_request(self.target, self.cfg, rec, body, self.t0), self.cfg.timeout)
        except (asyncio.TimeoutError, TimeoutError):  # noqa: UP041 - distinct classes before Python 3.11
            rec.error = "timeout"
        except (ConnectionRefusedError, socket.gaierror) as exc:
            rec.error, rec.detail = "connect", str(exc)
        except (OSError, asyncio.IncompleteReadError, HTTPError, ValueError) as exc:
            rec.error, rec.detail = "transport", f"{type(exc).__name__}: {exc}"
        finally:
            self.inflight -= 1
            if rec.latency is None:
                rec.latency = time.perf_counter() - self.t0 - rec.start
            if rec.error:
                rec.ok = False

    async def _closed_loop(self) -> None:
        async def worker():
            while True:
                rec = self._next()
                if rec is None:
                    return
                await self._execute(rec)

        await asyncio.gather(*(worker() for _ in range(self.cfg.concurrency)))

    async def _open_loop(self) -> None:
        tasks = set()
        next_at = time.perf_counter()
        while True:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = self._next()
            if rec is None:
                break
            if self.inflight >= self.cfg.max_inflight:
                rec.error = "client_inflight_cap"
                rec.latency = 0.0
            else:
                task = asyncio.ensure_future(self._execute(rec))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            gap = 1.0 / self.cfg.rate
            next_at += self.rng.expovariate(self.cfg.rate) if self.cfg.arrival == "poisson" else gap
        if tasks:
            await asyncio.gather(*tasks)

    def _progress_line(self) -> str:
        now = time.perf_counter() - self.t0
        done = [r for r in self.records if r.latency is not None and (r.ok or r.error)]
        ok = [r for r in done if r.ok]
        toks = sum(r.tokens for r in ok)
        p50 = percentile([r.latency for r in ok], 50)
        return (
            f"[{now:6.1f}s] done {len(done)}/{self.cfg.requests} inflight {self.inflight} ok {len(ok)} "
            f"err {len(done) - len(ok)} | {len(ok) / max(now, 1e-9):.2f} req/s {toks / max(now, 1e-9):.1f} tok/s "
            f"| p50 {_fmt(p50)} s"
        )

    async def _progress(self) -> None:
        tty = hasattr(self.out, "isatty") and self.out.isatty()
        while True:
            await asyncio.sleep(self.cfg.progress)
            self.out.write(("\r" if tty else "") + self._progress_line() + ("" if tty else "\n"))
            self.out.flush()

    def stop(self) -> None:
        """Issue no new request; the ones in flight finish and are counted (SIGINT/SIGTERM)."""
        self.stop_at = 0.0

    async def run(self) -> float:
        self.t0 = time.perf_counter()
        self.stop_at = self.t0 + self.cfg.duration
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        prog = asyncio.ensure_future(self._progress()) if self.cfg.progress > 0 else None
        try:
            if self.cfg.concurrency:
                await self._closed_loop()
            else:
                await self._open_loop()
        finally:
            if prog:
                prog.cancel()
                try:
                    await prog
                except asyncio.CancelledError:
                    pass
                tty = hasattr(self.out, "isatty") and self.out.isatty()
                self.out.write(("\r" if tty else "") + self._progress_line() + "\n")
            self.target.close()
        ends = [r.start + r.latency for r in self.records if r.latency is not None]
        starts = [r.start for r in self.records]
        return (max(ends) - min(starts)) if ends else 0.0


def build_result(cfg: Config, records: Sequence[Record], wall: float, started_at: str) -> dict:
    conf = asdict(cfg)
    conf.pop("api_key", None)
    conf["mix"] = [asdict(c) for c in cfg.mix]
    result = {"tool": "herd_load", "version": VERSION, "started_at": started_at, "config": conf}
    result.update(summarize(records, wall))
    if cfg.keep_samples:
        result["samples"] = [asdict(r) for r in records]
    return result


def run(cfg: Config, resolver: Callable[[str, int], list[str]] = resolve, out=sys.stderr) -> dict:
    """Check the target, run the load, return the result dict."""
    target = Target(cfg.url, cfg.insecure)
    allowed, why = target_allowed(target.host, resolver(target.host, target.port), cfg.allow_remote)
    if not allowed:
        raise PermissionError(why)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runner = Runner(cfg, target, out)
    wall = asyncio.run(runner.run())
    return build_result(cfg, runner.records, wall, started_at)


# ---------------------------------------------------------------- CLI


def _positive(kind):
    def conv(text):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError("must be > 0")
        return v
    return conv


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse the command line into a run Config plus the output options."""
    p = argparse.ArgumentParser(
        prog="herd_load",
        description="Bounded load generator for Ollama's /api/generate, /api/chat and /v1/chat/completions.",
        epilog="Targets outside loopback and private networks are refused unless --allow-remote is given.",
    )
    p.add_argument("--url", required=True, help="base URL of the gateway or instance, e.g. http://127.0.0.1:8080")
    p.add_argument("--api", choices=sorted(API_PATHS), default="generate", help="endpoint to load (default generate)")
    p.add_argument("--model", default="llama3.2:1b", help="model name sent in every request")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=_positive(int), help="closed loop: this many clients, back to back")
    mode.add_argument("--rate", type=_positive(float), help="open loop: new requests per second")
    p.add_argument("--arrival", choices=("poisson", "constant"), default="poisson",
                   help="arrival process with --rate (default poisson)")
    p.add_argument("--max-inflight", type=_positive(int), default=1024,
                   help="with --rate, arrivals beyond this many in flight are counted as client_inflight_cap")
    p.add_argument("--requests", type=_positive(int), default=100, help="stop after this many requests (default 100)")
    p.add_argument("--duration", type=_positive(float), default=60.0,
                   help="stop issuing requests after this many seconds (default 60)")
    p.add_argument("--stream", dest="stream", action="store_true", default=True, help="stream answers (default)")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="ask for whole answers")
    p.add_argument("--prompt-mix", default="short",
                   help="NAME:PROMPT_WORDS:MAX_TOKENS[:WEIGHT],... or a preset: {} (default short)".format(", ".join("{}={}".format(*kv) for kv in sorted(MIX_PRESETS.items()))))
    p.add_argument("--seed", type=int, default=1, help="seed for the mix and arrival times (default 1)")
    p.add_argument("--timeout", type=_positive(float), default=600.0, help="per-request timeout in seconds")
    p.add_argument("--api-key", default=os.environ.get("HERD_LOAD_API_KEY"),
                   help="Bearer key for the gateway (default $HERD_LOAD_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="with https, do not verify the certificate")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow targets outside loopback/private networks (only clusters you own)")
    p.add_argument("--progress", type=float, default=1.0, help="seconds between progress lines, 0 for none")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no table on stdout")
    p.add_argument("--no-samples", action="store_true", help="leave per-request samples out of the JSON")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--markdown", help="write the markdown table here")
    p.add_argument("--plot", help="write a PNG plot here (needs matplotlib; skipped with a note otherwise)")
    a = p.parse_args(argv)
    if a.requests > MAX_REQUESTS:
        p.error(f"--requests is capped at {MAX_REQUESTS}")
    if a.duration > MAX_DURATION_S:
        p.error(f"--duration is capped at {MAX_DURATION_S:.0f} s")
    if a.concurrency and a.concurrency > MAX_CONCURRENCY:
        p.error(f"--concurrency is capped at {MAX_CONCURRENCY}")
    if not a.concurrency and not a.rate:
        a.concurrency = 1
    try:
        mix = parse_mix(a.prompt_mix)
    except ValueError as exc:
        p.error(str(exc))
    cfg = Config(
        url=a.url, api=a.api, model=a.model, concurrency=a.concurrency, rate=a.rate, arrival=a.arrival,
        max_inflight=a.max_inflight, requests=a.requests, duration=a.duration, stream=a.stream, mix=mix,
        seed=a.seed, timeout=a.timeout, api_key=a.api_key, insecure=a.insecure, allow_remote=a.allow_remote,
        progress=0.0 if a.quiet else a.progress, keep_samples=not a.no_samples,
    )
    return cfg, a


def main(argv: Sequence[str] | None = None) -> int:
    cfg, opts = parse_args(argv)
    json_path, md_path, png_path, quiet = opts.json, opts.markdown, opts.plot, opts.quiet
    try:
        result = run(cfg)
    except PermissionError as exc:
        print(f"herd_load: refused: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"herd_load: {exc}", file=sys.stderr)
        return 2
    md = render_markdown(result)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")
    if md_path:
        with open(md_path, "w", encoding="utf-8") as fh:
            fh.write(md)
    if png_path and not plot(result, png_path):
        print("herd_load: matplotlib is not importable, no plot written", file=sys.stderr)
    if not quiet:
        sys.stdout.write(md)
    s = result["summary"]
    return 0 if s["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
