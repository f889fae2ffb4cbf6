#!/usr/bin/env python3
"""herd gateway benchmark on loopback: overload, balancing policies and the ideal central FIFO.

Starts N Ollama emulator processes (lab/standins/ollama_emulator.py, with its timing model: a slot's token rate
falls with the slots generating beside it by a measured batch curve, prompts cost time per uncached token and hold
up the other slots; docs/standins.md) on 127.0.0.1, nginx with herd's gateway rendered by role gateway's own tasks
(benchmarks/herd_render.py: every file the role renders, its filters, defaults and vars) and with the seed
configurations to compare, optionally LiteLLM's proxy, and drives them with tools/herd_load.py (closed loop,
the same request list for every run). Writes docs/benchmarks/<date>-lab.{md,json,png}.

Run it through benchmarks/run.sh (full report) or with --short (a quick pass that `make unit` runs through
tests/unit/benchmarks, so that a change of the role cannot break the benchmark unseen).

Sections:
  1. overload     herd, seed 000, seed 003, round-robin and random at concurrency = slots, 2x and 3x,
                  beside the ideal central FIFO computed from the same request list
  2. streaming    TTFT through the gateway vs direct to the instance, at the instance's slots
  3. peer router  the same instances behind LiteLLM's proxy vs herd's gateway
  4. multi-turn   chat conversations (history resent every turn, emulated per-slot prompt cache and prompt
                  evaluation time) through herd with cache affinity on and off (least loaded)
  5. noisy neighbour, 6. accounting cost (see their functions)
  7. agent fleet  agent sessions sharing long per-agent prefixes (system prompt and tool definitions), many
                  turns with think time, more sessions than slots: prefix routing (herd), conversation
                  affinity (herd-conv) and least loaded (herd-noaff)
Every target is 127.0.0.1; every run is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import http.client
import importlib.util
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import herd_render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = ROOT / "lab" / "standins" / "ollama_emulator.py"
MKMODELS = ROOT / "lab" / "standins" / "mkmodels.py"
LOAD_TOOL = ROOT / "tools" / "herd_load.py"
GPU_SPEC = ROOT / "lab" / "gpus" / "rtx4090x8.json"

MODEL = "herd-tiny:1b"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CONFIGS = ("herd", "herd-noaff", "seed-000", "seed-003", "round-robin", "random")
LABELS = {
    "herd": "herd (role gateway)",
    "herd-noaff": "herd, gateway_affinity off (least loaded)",
    "herd-conv": "herd, gateway_affinity conversation (first messages)",
    "herd-mu": "herd, instances as Ollama 0.3.13-0.29 with OLLAMA_MULTIUSER_CACHE=1",
    "herd-noaff-mu": "herd, gateway_affinity off, instances as Ollama 0.3.13-0.29 with OLLAMA_MULTIUSER_CACHE=1",
    "seed-000": "seed 000: least_conn + zone + keepalive",
    "seed-003": "seed 003: least_conn, max_conns = slots",
    "round-robin": "round-robin + zone + keepalive",
    "random": "random + zone + keepalive",
    "baseline": "herd before the queue (role gateway at --baseline-ref)",
    "ideal": "ideal central FIFO (computed)",
    "keys-fair": "herd, two API keys, fair share (default)",
    "keys-fifo": "herd, two API keys, gateway_fair_share false (one FIFO)",
    "herd-noacct": "herd, gateway_token_accounting false",
}
# The noisy-neighbour section's two API keys (lab values, not secrets).
NOISY_KEY = "noisy-bench-key-0123456789abcdefghijklm"
QUIET_KEY = "quiet-bench-key-0123456789abcdefghijklm"


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


herd_load = _load_module(LOAD_TOOL, "herd_load_for_bench")
emulator = _load_module(EMULATOR, "ollama_emulator_for_bench")


# Prompt tokens/s of an 8B model by the emulator's K / parameters (the multi-turn and agent sections' default).
PREFILL_8B = round(emulator.PREFILL_PARAMS_TOKENS_PER_SECOND / 8.0e9)


def step_ratio(batch: int) -> float:
    """The emulator's decode step-time ratio T(batch) (its default batch curve)."""
    return emulator.step_ratio(emulator.BATCH_STEP_RATIOS, batch)
percentile = herd_load.percentile


# ---------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Wait until `url` answers HTTP (any status below 500)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
            last = exc
        except Exception as exc:  # noqa: BLE001 - any failure means "not up yet"
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s: {last}")


def cmd_out(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (res.stdout + res.stderr).strip()


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user+system) of one live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def fmt(v, digits=3, unit=""):
    if v is None:
        return "-"
    return f"{v:.{digits}f}{unit}"


# ---------------------------------------------------------------- processes


class Procs:
    """Every process this benchmark starts; all are stopped at the end, by pid."""

    def __init__(self):
        self.items: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None, log_path: Path | None = None):
        fh = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        self.items[name] = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self.items[name]

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 10.0) -> None:
        p = self.items.pop(name, None)
        if p is None or p.poll() is not None:
            return
        os.killpg(p.pid, sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def stop_all(self) -> None:
        for name in list(self.items):
            self.stop(name)

    def cpu(self, prefix: str) -> float:
        total = 0.0
        for name, p in self.items.items():
            if name.startswith(prefix) and p.poll() is None:
                total += proc_cpu_s(p.pid) + sum(proc_cpu_s(c) for c in children_of(p.pid))
        return total


# ---------------------------------------------------------------- gateway configurations


def seed_conf(name: str, ports: list[int], slots: int, listen: int) -> str:
    """One seed configuration: an upstream over every instance with one of nginx's own policies."""
    policy = {"seed-000": "least_conn;", "seed-003": "least_conn;", "round-robin": "", "random": "random;"}[name]
    limit = f" max_conns={slots}" if name == "seed-003" else ""
    servers = "\n".join(f"    server {HOST}:{p}{limit};" for p in ports)
    return f"""\
# {LABELS[name]} (written by benchmarks/gateway_bench.py)
upstream bench_seed {{
    zone bench_seed 256k;
    {policy}
{servers}
    keepalive 32;
}}
server {{
    listen {HOST}:{listen};
    access_log off;
    add_header X-Herd-Upstream $upstream_addr always;
    location / {{
        proxy_pass http://bench_seed;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout 600s;
    }}
}}
"""


def instance_plan(ports: list[int], num_parallel: int) -> list[dict]:
    """One host's ollama_instances (the fields role gateway reads) for emulators on `ports`."""
    return [{"id": i, "name": f"ollama-{i}", "port": p, "bind_address": HOST, "num_parallel": num_parallel,
             "local_url": f"http://{HOST}:{p}", "endpoint": f"{HOST}:{p}", "models": [MODEL]}
            for i, p in enumerate(ports)]


class Gateway:
    """nginx from one prefix at a time, on one fixed loopback port."""

    def __init__(self, procs: Procs, work: Path, workers: int | str | None):
        self.procs = procs
        self.work = work
        self.workers = workers
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.prefixes: dict[str, herd_render.Prefix] = {}

    def render_herd(self, name: str, ports: list[int], num_parallel: int, roles: Path | None = None,
                    overrides: dict | None = None) -> herd_render.Prefix:
        log(f"rendering {name} with role gateway's tasks ({len(ports)} instances)")
        pre = herd_render.render_gateway(self.work / f"nginx-{name}", instance_plan(ports, num_parallel), self.port,
                                         overrides=overrides, workers=self.workers, roles=roles)
        log(f"  -> {len(pre.files)} files in {pre.render_seconds:.0f} s: "
            + ", ".join(str(p.relative_to(pre.path)) for p in pre.files))
        self.prefixes[name] = pre
        return pre

    def write_seed(self, name: str, ports: list[int], slots: int) -> herd_render.Prefix:
        pre = herd_render.write_conf(self.work / f"nginx-{name}", "bench-seed.conf",
                                     seed_conf(name, ports, slots, self.port), self.workers)
        self.prefixes[name] = pre
        return pre

    def start(self, name: str) -> None:
        pre = self.prefixes[name]
        self.procs.start("nginx", pre.nginx_argv(), log_path=pre.path / "stdout.log")
        try:
            wait_http(self.url + "/api/version", 15)
        except RuntimeError as exc:
            tail = pre.error_log.read_text(errors="replace")[-2000:] if pre.error_log.exists() else ""
            raise RuntimeError(f"nginx for {name} did not come up: {exc}\n{tail}") from exc

    def stop(self) -> None:
        self.procs.stop("nginx", sig=signal.SIGQUIT)


# ---------------------------------------------------------------- the ideal central FIFO


def ideal_fifo(tokens: list[int], concurrency: int, slots: int, token_s: float, first_s: float = 0.0) -> dict:
    """Closed loop through one FIFO queue in front of `slots` identical slots (what a perfect gateway does).

    `concurrency` clients each send request i+1.. as soon as their previous answer ends, taking the next
    request of `tokens` (answer lengths, in order). A request starts on the first slot that frees, waits in
    arrival order, and streams `first_s` + n * `token_s`; its first token comes `first_s` + `token_s` after
    it starts. Returns the same figures as a measured run.
    """
    n = len(tokens)
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, request)
    seq = 0
    arrivals: list[float] = [0.0] * n
    ttft: list[float] = [0.0] * n
    latency: list[float] = [0.0] * n
    queue: list[int] = []
    free = slots
    issued = 0
    for _ in range(min(concurrency, n)):
        heapq.heappush(events, (0.0, seq, "arrive", issued))
        seq += 1
        issued += 1
    end = 0.0
    qhead = 0
    while events:
        t, _s, kind, i = heapq.heappop(events)
        if kind == "arrive":
            arrivals[i] = t
            queue.append(i)
        else:  # done
            free += 1
            latency[i] = t - arrivals[i]
            end = max(end, t)
            if issued < n:
                heapq.heappush(events, (t, seq, "arrive", issued))
                seq += 1
                issued += 1
        while free and qhead < len(queue):
            j = queue[qhead]
            qhead += 1
            free -= 1
            ttft[j] = t - arrivals[j] + first_s + token_s
            heapq.heappush(events, (t + first_s + tokens[j] * token_s, seq, "done", j))
            seq += 1
    total = sum(tokens)
    return {"requests": n, "ok": n, "errors_by_status": {}, "wall_s": end, "output_tokens": total,
            "output_tokens_per_s": total / end if end else None,
            "ttft_s": herd_load.distribution(ttft), "latency_s": herd_load.distribution(latency)}


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.procs = Procs()
        self.ports: list[int] = []
        self.runs: dict[str, dict] = {}
        self.cpu: dict[str, dict] = {}

    @property
    def slots(self) -> int:
        return self.args.instances * self.args.num_parallel

    def mix(self) -> str:
        a = self.args
        return (f"short:{a.prompt_words}:{a.short_tokens}:{a.short_weight},"
                f"long:{a.prompt_words}:{a.long_tokens}:{a.long_weight}")

    # -- setup

    def start_emulators(self, prompt_tps: float = 1000000, extra_env: dict | None = None) -> None:
        """Start the instances (again, on the same ports, when they run already) with `prompt_tps` prompt tokens
        per second: 1e6 = no prompt time (sections 1-3), a realistic rate for the multi-turn section; `extra_env`
        added to their environment."""
        a = self.args
        models = self.work / "models"
        if not models.exists():
            subprocess.run([sys.executable, str(MKMODELS), str(models), "--model", MODEL], check=True,
                           stdout=subprocess.DEVNULL)
        restart = bool(self.ports)
        for i in range(a.instances):
            if restart:
                self.procs.stop(f"emu{i}")
            port = self.ports[i] if restart else free_port()
            env = dict(os.environ)
            env.update({
                "OLLAMA_HOST": f"{HOST}:{port}",
                "OLLAMA_MODELS": str(models),
                "OLLAMA_NUM_PARALLEL": str(a.num_parallel),
                "OLLAMA_MAX_QUEUE": "512",
                "OLLAMA_KEEP_ALIVE": "-1",
                "CUDA_VISIBLE_DEVICES": str(i % 8),
                "HERD_LAB_GPU_SPEC": str(GPU_SPEC),
                "HERD_EMU_TOKENS_PER_SECOND": str(1.0 / a.token_seconds),
                # the emulator's batch curve (no HERD_EMU_BUSY_SLOWDOWN); sections 1-3 send prompts of a few
                # tokens with no prompt time (1e6/s), the multi-turn and agent sections an 8B model's prompt rate
                "HERD_EMU_PROMPT_TOKENS_PER_SECOND": str(prompt_tps),
                "HERD_EMU_RESPONSE_TOKENS": str(a.short_tokens),
                "TMPDIR": str(self.work / "tmp"),
                **(extra_env or {}),
            })
            log_name = f"emu{i}-chat.log" if restart else f"emu{i}.log"
            self.procs.start(f"emu{i}", [sys.executable, str(EMULATOR), "serve"], env=env,
                             log_path=self.work / log_name)
            if not restart:
                self.ports.append(port)
        for port in self.ports:
            wait_http(f"http://{HOST}:{port}/api/version", 60)
        # load the model on every instance before measuring (not part of any number)
        for port in self.ports:
            self.load(f"warm-{port}", f"http://{HOST}:{port}", "generate", concurrency=1, requests=1,
                      mix="w:8:2", record=False)

    def served(self) -> list[int]:
        """Inference requests each emulator has logged so far (its Ollama-style access log)."""
        out = []
        for i in range(len(self.ports)):
            text = (self.work / f"emu{i}.log").read_text(errors="replace")
            out.append(len(re.findall(r'POST\s+"/(?:api/generate|api/chat|v1/chat/completions)"', text)))
        return out

    # -- one load run

    def load(self, name: str, url: str, api: str, concurrency: int, requests: int, mix: str,
             record: bool = True, api_key: str | None = None) -> dict:
        out = self.work / "runs" / f"{name}.json"
        out.parent.mkdir(exist_ok=True)
        argv = ["python3", str(LOAD_TOOL), "--url", url, "--api", api, "--model", MODEL,
                "--concurrency", str(concurrency), "--requests", str(requests), "--seed", str(self.args.seed),
                "--duration", str(self.args.max_run_seconds), "--prompt-mix", mix,
                "--timeout", "120", "--json", str(out), "--quiet" if not record else "--progress=5"]
        if api_key:
            argv += ["--api-key", api_key]
        if record:
            log(f"run {name}: {api} {url} c={concurrency} n={requests} mix={mix}")
        served0 = self.served()
        busy0, total0 = machine_busy()
        emu0, ngx0, llm0 = self.procs.cpu("emu"), self.procs.cpu("nginx"), self.procs.cpu("litellm")
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        res = subprocess.run(argv, stdout=subprocess.DEVNULL, check=False)
        elapsed = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy1, total1 = machine_busy()
        if res.returncode not in (0, 1):
            raise RuntimeError(f"load run {name} failed with {res.returncode}")
        data = json.loads(out.read_text())
        if record:
            self.cpu[name] = {
                "elapsed_s": elapsed,
                "machine_busy": (busy1 - busy0) / max(total1 - total0, 1),
                "emulators_cpu_s": self.procs.cpu("emu") - emu0,
                "nginx_cpu_s": self.procs.cpu("nginx") - ngx0,
                "litellm_cpu_s": self.procs.cpu("litellm") - llm0,
                "load_tool_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                "cores": os.cpu_count() or 1,
                "served_by_instance": [b - a for a, b in zip(served0, self.served(), strict=True)],
            }
            s = data["summary"]
            log(f"  -> ok {s['ok']}/{s['requests']} {s['output_tokens_per_s']:.1f} tok/s "
                f"TTFT p99 {fmt(s['ttft_s']['p99'])} s errors {s['errors_by_status'] or 'none'}")
            self.runs[name] = data
        return data

    # -- sections

    def run_all(self) -> dict:
        a = self.args
        gw = Gateway(self.procs, self.work, a.nginx_workers)
        extra: dict = {"files": {}}
        for name in a.configs:
            if name == "herd":
                pre = gw.render_herd("herd", self.ports, a.num_parallel)
                extra["gateway_origin"] = pre.origin
            elif name == "herd-noaff":
                pre = gw.render_herd("herd-noaff", self.ports, a.num_parallel, overrides={"gateway_affinity": "off"})
            elif name == "baseline":
                pre = gw.render_herd("baseline", self.ports, a.num_parallel, roles=self.baseline_roles())
                extra["baseline_origin"] = f"role gateway at {a.baseline_ref}"
            else:
                pre = gw.write_seed(name, self.ports, a.num_parallel)
            extra["files"][name] = [str(p.relative_to(pre.path)) for p in pre.files]

        # 1. overload: every configuration at concurrency = slots x each multiplier, same request list
        for name in a.configs:
            gw.start(name)
            try:
                for m in self.multipliers(name):
                    self.load(f"{name}-x{m}", gw.url, "generate", self.slots * m, a.requests, self.mix())
                if name == "herd":
                    extra["herd_pools"] = self.snapshot(gw.url + "/herd/pools")
            finally:
                gw.stop()

        # 2. streaming: TTFT at concurrency = slots with nothing to wait for, direct vs through herd's gateway
        if a.ttft_requests and "herd" in a.configs:
            short = f"short:{a.prompt_words}:{a.short_tokens}"
            self.load_direct("ttft-direct", a.ttft_requests, short)
            gw.start("herd")
            try:
                self.load("ttft-gateway", gw.url, "generate", self.slots, a.ttft_requests, short)
            finally:
                gw.stop()
            # 6. the cost of token accounting: the same run through herd's gateway with it off
            gw.render_herd("herd-noacct", self.ports, a.num_parallel, overrides={"gateway_token_accounting": False})
            gw.start("herd-noacct")
            try:
                self.load("ttft-gateway-noacct", gw.url, "generate", self.slots, a.ttft_requests, short)
            finally:
                gw.stop()

        # 3. peer router
        extra["litellm"] = self.section_litellm(gw) if "herd" in a.configs else {"status": "skipped",
                                                                                  "reason": "herd not run"}

        # 5. noisy neighbour: two API keys on one instance's pool, fair share on and off
        if a.noisy_seconds and "herd" in a.configs:
            extra["noisy"] = self.noisy_section(gw)

        # 4. multi-turn chat: affinity on (herd) and off (herd-noaff), the same conversations, prompt time on
        if a.chat_conversations and {"herd", "herd-noaff"} <= set(a.configs):
            log(f"restarting the emulators with {a.chat_prompt_tps:g} prompt tokens/s and the per-slot prompt cache")
            self.start_emulators(prompt_tps=a.chat_prompt_tps)
            extra["chat"] = {}
            for name in ("herd", "herd-noaff"):
                self.start_emulators(prompt_tps=a.chat_prompt_tps)  # empty prompt caches for each run
                gw.start(name)
                try:
                    extra["chat"][name] = self.chat_run(f"chat-{name}", gw.url, self.conversations(),
                                                        a.chat_clients or self.slots, a.chat_answer_tokens,
                                                        a.chat_think_s)
                finally:
                    gw.stop()

        # 7. agent fleet: the same sessions through prefix routing, conversation affinity and least loaded
        if a.fleet_sessions and {"herd", "herd-noaff"} <= set(a.configs):
            gw.render_herd("herd-conv", self.ports, a.num_parallel, overrides={"gateway_affinity": "conversation"})
            extra["fleet"] = {}
            runs = [("herd", "herd", None), ("herd-conv", "herd-conv", None), ("herd-noaff", "herd-noaff", None)]
            if a.fleet_multiuser:
                # the same on the runner of Ollama 0.3.13-0.29 with its multi-user cache, as herd's planner sets it
                # there (ollama_multiuser_cache): a busy slot's prefix forked into a free one, nothing kept past the
                # slots, so the gateway is rendered as docs/gateway.md says for those releases
                # (gateway_prefix_host_cache_bytes: 0)
                mu = {"HERD_EMU_RUNNER": "llamarunner", "OLLAMA_MULTIUSER_CACHE": "1"}
                gw.render_herd("herd-mu", self.ports, a.num_parallel,
                               overrides={"gateway_prefix_host_cache_bytes": 0})
                runs += [("herd-mu", "herd-mu", mu), ("herd-noaff-mu", "herd-noaff", mu)]
            for key, name, env in runs:
                # every run starts with empty prompt caches: the instances restart (same ports)
                self.start_emulators(prompt_tps=a.chat_prompt_tps, extra_env=env)
                gw.start(name)
                try:
                    extra["fleet"][key] = self.chat_run(f"fleet-{key}", gw.url, self.fleet(),
                                                        a.fleet_clients or (3 * self.slots) // 2,
                                                        a.fleet_answer_tokens, a.fleet_think_s, a.fleet_ramp_s)
                finally:
                    gw.stop()
        return extra

    def noisy_section(self, gw: Gateway) -> dict:
        """A pool of one instance's slots shared by two API keys: `noisy` keeps --noisy-clients streaming clients
        busy for --noisy-seconds, `quiet` sends --quiet-requests one at a time. The quiet key alone first, then
        beside the noise with fair share on and off (gateway_fair_share), each gateway rendered by the role."""
        a = self.args
        keys = [{"name": "noisy", "key": NOISY_KEY}, {"name": "quiet", "key": QUIET_KEY}]
        ports = self.ports[:1]
        mix = f"n:{a.prompt_words}:{a.noisy_tokens}"
        out: dict = {"slots": a.num_parallel, "answer_tokens": a.noisy_tokens,
                     "answer_s": a.noisy_tokens * a.token_seconds, "noisy_clients": a.noisy_clients,
                     "quiet_requests": a.quiet_requests, "seconds": a.noisy_seconds}
        for name, fair in (("keys-fair", True), ("keys-fifo", False)):
            gw.render_herd(name, ports, a.num_parallel, overrides={"gateway_api_keys": keys, "gateway_fair_share": fair,
                                                                   "gateway_queue_max": 256})
        gw.start("keys-fair")
        try:
            alone = self.load("quiet-alone", gw.url, "generate", 1, a.quiet_requests, mix, api_key=QUIET_KEY)
        finally:
            gw.stop()
        out["alone"] = self.key_figures(alone["summary"])
        for name in ("keys-fair", "keys-fifo"):
            gw.start(name)
            try:
                log_path = next(gw.prefixes[name].path.rglob("herd-gateway.access.log"), None)
                skip = len(log_path.read_text().splitlines()) if log_path and log_path.exists() else 0
                noise = self.load_async(f"{name}-noisy", gw.url, a.noisy_clients, 100000, mix, NOISY_KEY,
                                        a.noisy_seconds)
                time.sleep(min(2.0, a.noisy_seconds / 4))  # the pool full and the noisy key's queue built up
                quiet = self.load(f"{name}-quiet", gw.url, "generate", 1, a.quiet_requests, mix, api_key=QUIET_KEY)
                noisy = self.finish_async(noise)
            finally:
                gw.stop()
            tokens = noisy["summary"]["output_tokens"] + quiet["summary"]["output_tokens"]
            wall = self.cpu[f"{name}-noisy"]["elapsed_s"]  # collected after the quiet run: until both ended
            out[name] = {"quiet": self.key_figures(quiet["summary"]), "noisy": self.key_figures(noisy["summary"]),
                         "pool_tokens_per_s": tokens / wall if wall else None,
                         "waits": self.quiet_waits(log_path, skip)}
            log(f"  -> {name}: quiet TTFT p90 {fmt(out[name]['quiet']['ttft_p90'])} s, pool "
                f"{fmt(out[name]['pool_tokens_per_s'], 1)} tok/s")
        return out

    @staticmethod
    def key_figures(s: dict) -> dict:
        return {"requests": s["requests"], "ok": s["ok"], "ttft_p50": s["ttft_s"]["p50"],
                "ttft_p90": s["ttft_s"]["p90"], "ttft_max": s["ttft_s"]["max"],
                "output_tokens_per_s": s["output_tokens_per_s"]}

    @staticmethod
    def quiet_waits(log_path: Path | None, skip: int) -> dict:
        """From the gateway's access log: each key's queue waits (seconds) and how many of its requests waited."""
        if not log_path or not log_path.exists():
            return {}
        recs = []
        for line in log_path.read_text().splitlines()[skip:]:
            rec = json.loads(line)
            if rec.get("queue_wait") in (None, "") or rec.get("status") != "200":
                continue
            recs.append((rec["key"], float(rec["queue_wait"])))
        out = {}
        for key in sorted({k for k, _ in recs}):
            waits = [w for k, w in recs if k == key]
            out[key] = {"wait": herd_load.distribution(waits), "waited_10ms": sum(1 for w in waits if w >= 0.01)}
        return out

    def load_async(self, name: str, url: str, concurrency: int, requests: int, mix: str, api_key: str,
                   seconds: float) -> tuple:
        """Start a load run in the background (finish_async collects it)."""
        out = self.work / "runs" / f"{name}.json"
        out.parent.mkdir(exist_ok=True)
        argv = ["python3", str(LOAD_TOOL), "--url", url, "--api", "generate", "--model", MODEL,
                "--concurrency", str(concurrency), "--requests", str(requests), "--seed", str(self.args.seed),
                "--duration", str(seconds), "--prompt-mix", mix, "--timeout", "120", "--json", str(out), "--quiet",
                "--api-key", api_key]
        log(f"run {name}: generate {url} c={concurrency} for {seconds:g} s mix={mix} (background)")
        return name, out, subprocess.Popen(argv, stdout=subprocess.DEVNULL), time.monotonic()

    def finish_async(self, run: tuple) -> dict:
        name, out, proc, t0 = run
        if proc.wait(timeout=self.args.max_run_seconds + 120) not in (0, 1):
            raise RuntimeError(f"load run {name} failed with {proc.returncode}")
        data = json.loads(out.read_text())
        self.cpu[name] = {"elapsed_s": time.monotonic() - t0, "machine_busy": 0.0, "emulators_cpu_s": 0.0,
                          "nginx_cpu_s": 0.0, "litellm_cpu_s": 0.0, "load_tool_cpu_s": 0.0,
                          "cores": os.cpu_count() or 1, "served_by_instance": []}
        self.runs[name] = data
        return data

    @staticmethod
    def texts(seed: int):
        """A seeded generator of filler text of a given size in bytes."""
        rnd = random.Random(seed)
        vocab = ("herd gateway model slot cache token prompt answer queue instance turn history route load balance "
                 "nginx ollama lab chat context memory reply question summary detail").split()

        def text(n_bytes: int) -> str:
            words: list[str] = []
            size = 0
            while size < n_bytes:
                w = rnd.choice(vocab)
                words.append(w)
                size += len(w) + 1
            return " ".join(words)[:n_bytes]
        return text

    def conversations(self) -> list[dict]:
        """The multi-turn workload: a shared system prompt, then per conversation a document and follow-ups."""
        a = self.args
        text = self.texts(a.seed)
        system = "You are herd's benchmark assistant. " + text(max(0, a.chat_system_bytes - 36))
        convs = []
        for c in range(a.chat_conversations):
            turns = [f"Conversation {c}. Read this document: " + text(a.chat_doc_bytes)]
            turns += [f"Follow-up {t}: " + text(a.chat_turn_bytes) for t in range(1, a.chat_turns)]
            convs.append({"id": c, "system": system, "turns": turns})
        return convs

    def fleet(self) -> list[dict]:
        """The agent-fleet workload: --fleet-agents agent types, each with its own long prefix (instructions and
        tool definitions, --fleet-prefix-bytes, sent as the system prompt every turn); --fleet-sessions sessions,
        agent types in turn, each a task then --fleet-turns - 1 tool results (the history resent every turn)."""
        a = self.args
        text = self.texts(a.seed + 7)
        agents = [f"You are coding agent {k}. Tools: read_file, write_file, run_tests, search. "
                  + text(max(0, a.fleet_prefix_bytes - 80)) for k in range(a.fleet_agents)]
        sessions = []
        for c in range(a.fleet_sessions):
            turns = [f"Session {c}. Task: " + text(a.fleet_task_bytes)]
            turns += [f"Tool result {t}: " + text(a.fleet_tool_bytes) for t in range(1, a.fleet_turns)]
            sessions.append({"id": c, "agent": c % a.fleet_agents, "system": agents[c % a.fleet_agents],
                             "turns": turns})
        return sessions

    def chat_turn(self, url: str, messages: list[dict], answer_tokens: int) -> dict:
        """One streamed /api/chat request: TTFT, latency, the answer, the server's counts, the instance."""
        host, port = url.split("//", 1)[1].split(":")
        body = json.dumps({"model": MODEL, "messages": messages, "stream": True,
                           "options": {"num_predict": answer_tokens}})
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        rec = {"ok": False, "ttft": None, "latency": None, "instance": None, "answer": "",
               "prompt_eval_count": None, "eval_count": 0, "status": None}
        try:
            conn.request("POST", "/api/chat", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            rec["status"] = resp.status
            rec["instance"] = resp.getheader("X-Herd-Upstream")
            parts = []
            for line in resp:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if rec["ttft"] is None and not obj.get("done"):
                    rec["ttft"] = time.monotonic() - t0
                parts.append((obj.get("message") or {}).get("content") or "")
                if obj.get("done"):
                    rec["prompt_eval_count"] = obj.get("prompt_eval_count")
                    rec["eval_count"] = obj.get("eval_count") or 0
                    rec["ok"] = resp.status == 200
            rec["answer"] = "".join(parts)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            rec["error"] = str(exc)[:200]
        finally:
            conn.close()
        rec["latency"] = time.monotonic() - t0
        return rec

    def chat_run(self, name: str, url: str, convs: list[dict], clients: int, answer_tokens: int,
                 think_s: float, ramp_s: float = 0.0) -> dict:
        """Closed loop: `clients` clients each take the next conversation and send its turns one after another
        (the whole history every turn, `think_s` (0.5x-1.5x, seeded) after each answer); client i starts
        i x ramp_s / clients seconds in. Samples /herd/pools meanwhile for the most requests an instance held.
        Recorded as run `name`."""
        a = self.args
        log(f"run {name}: {len(convs)} conversations x {len(convs[0]['turns']) if convs else 0} turns, "
            f"{clients} clients, {url}")
        todo = list(reversed(convs))
        lock = threading.Lock()
        samples: list[dict] = []
        deadline = time.monotonic() + a.max_run_seconds
        stop = threading.Event()
        peak: dict[str, list[int]] = {}

        def watch():
            while not stop.is_set():
                try:
                    with urllib.request.urlopen(url + "/herd/pools", timeout=2) as resp:
                        for pool in json.loads(resp.read()).get("pools", []):
                            for inst in pool["instances"]:
                                cur = peak.setdefault(inst["key"], [0, inst["max_conns"]])
                                cur[0] = max(cur[0], inst["inflight"])
                except (OSError, ValueError):
                    pass
                stop.wait(0.02)

        def client(index):
            time.sleep(index * ramp_s / max(clients, 1))
            while time.monotonic() < deadline:
                with lock:
                    if not todo:
                        return
                    conv = todo.pop()
                messages = [{"role": "system", "content": conv["system"]}]
                think = random.Random(a.seed * 1000 + conv["id"])
                for t, text in enumerate(conv["turns"]):
                    if t:  # the user reads the answer and types: 0.5x to 1.5x the mean think time
                        time.sleep(think_s * think.uniform(0.5, 1.5))
                    if time.monotonic() >= deadline:
                        return
                    messages.append({"role": "user", "content": text})
                    sent = time.monotonic() - t0
                    rec = self.chat_turn(url, messages, answer_tokens)
                    rec.update({"conversation": conv["id"], "turn": t + 1, "sent_s": round(sent, 3),
                                "history_tokens": sum((len(m["content"]) + 3) // 4 + 4 for m in messages) + 4})
                    answer = rec.pop("answer")
                    with lock:
                        samples.append(rec)
                    if not rec["ok"]:
                        break
                    messages.append({"role": "assistant", "content": answer})

        served0 = self.served_chat()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.monotonic() - t0
        stop.set()
        watcher.join(5)
        if a.samples_dir:
            os.makedirs(a.samples_dir, exist_ok=True)
            with open(os.path.join(a.samples_dir, name + ".json"), "w", encoding="utf-8") as fh:
                json.dump(sorted(samples, key=lambda s: s["sent_s"]), fh, indent=0)
        ok = [s for s in samples if s["ok"]]
        follow = [s for s in ok if s["turn"] > 1]
        same = 0
        by_conv: dict[int, list[dict]] = {}
        for s in sorted(ok, key=lambda s: (s["conversation"], s["turn"])):
            by_conv.setdefault(s["conversation"], []).append(s)
        for turns in by_conv.values():
            same += sum(1 for x, y in zip(turns, turns[1:], strict=False) if x["instance"] == y["instance"])
        tokens = sum(s["eval_count"] for s in ok)
        evaluated = sum(s["prompt_eval_count"] or 0 for s in ok)
        history = sum(s["history_tokens"] for s in ok)
        summary = {
            "requests": len(samples), "ok": len(ok), "wall_s": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall if wall else None,
            "ttft_s": herd_load.distribution(s["ttft"] for s in ok if s["ttft"] is not None),
            "ttft_follow_s": herd_load.distribution(s["ttft"] for s in follow if s["ttft"] is not None),
            "ttft_first_s": herd_load.distribution(s["ttft"] for s in ok if s["turn"] == 1 and s["ttft"] is not None),
            "latency_s": herd_load.distribution(s["latency"] for s in ok),
            "same_instance_as_last_turn": same, "follow_up_turns": len(follow),
            "prompt_tokens_evaluated": evaluated, "prompt_tokens_sent": history,
            "max_history_tokens": max((s["history_tokens"] for s in ok), default=0),
            "peak_inflight": {k: {"peak": v[0], "max_conns": v[1]} for k, v in sorted(peak.items())},
            "served_by_instance": [b - a_ for a_, b in zip(served0, self.served_chat(), strict=True)],
        }
        log(f"  -> ok {len(ok)}/{len(samples)} TTFT p50 {fmt(summary['ttft_s']['p50'])} s p99 "
            f"{fmt(summary['ttft_s']['p99'])} s, {fmt(summary['output_tokens_per_s'], 1)} tok/s, follow-ups on the "
            f"same instance {same}/{len(follow)}")
        summary["herd_pools"] = self.snapshot(url + "/herd/pools")
        self.runs[name] = {"summary": summary, "samples": samples}
        return summary

    def served_chat(self) -> list[int]:
        out = []
        for i in range(len(self.ports)):
            f = self.work / f"emu{i}-chat.log"
            text = f.read_text(errors="replace") if f.exists() else ""
            out.append(len(re.findall(r'POST\s+"/api/chat"', text)))
        return out

    def snapshot(self, url: str) -> dict:
        """One GET of the gateway's own status (e.g. /herd/pools), kept raw in the report's JSON."""
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return {"url": url, "status": resp.status, "body": resp.read().decode("utf-8", "replace")}
        except urllib.error.HTTPError as exc:
            return {"url": url, "status": exc.code, "body": exc.read().decode("utf-8", "replace")[:2000]}
        except OSError as exc:
            return {"url": url, "status": None, "body": str(exc)}

    def load_direct(self, name: str, requests: int, mix: str) -> dict:
        """Every instance at its slots at once, each with its own clients and no gateway: the 'direct' figures
        at concurrency = slots (the requests split evenly over the instances)."""
        a = self.args
        per = max(1, requests // a.instances)
        log(f"run {name}: direct to each of {a.instances} instances, c={a.num_parallel} n={per} each, mix={mix}")
        outs, procs = [], []
        t0 = time.monotonic()
        for i, port in enumerate(self.ports):
            out = self.work / "runs" / f"{name}-{i}.json"
            out.parent.mkdir(exist_ok=True)
            outs.append(out)
            procs.append(subprocess.Popen(
                ["python3", str(LOAD_TOOL), "--url", f"http://{HOST}:{port}", "--api", "generate", "--model", MODEL,
                 "--concurrency", str(a.num_parallel), "--requests", str(per), "--seed", str(a.seed + i),
                 "--duration", str(a.max_run_seconds), "--prompt-mix", mix, "--timeout", "120",
                 "--json", str(out), "--quiet"], stdout=subprocess.DEVNULL))
        for p in procs:
            if p.wait() not in (0, 1):
                raise RuntimeError(f"load run {name} failed with {p.returncode}")
        samples = []
        for out in outs:
            samples += json.loads(out.read_text())["samples"]
        ok = [x for x in samples if x["ok"]]
        summary = {"requests": len(samples), "ok": len(ok), "wall_s": time.monotonic() - t0,
                   "ttft_s": herd_load.distribution(x["ttft"] for x in ok),
                   "latency_s": herd_load.distribution(x["latency"] for x in ok)}
        log(f"  -> ok {len(ok)}/{len(samples)} TTFT p50 {fmt(summary['ttft_s']['p50'])} s "
            f"p99 {fmt(summary['ttft_s']['p99'])} s")
        self.runs[name] = {"summary": summary, "samples": samples}
        return self.runs[name]

    def multipliers(self, name: str) -> list[int]:
        """The baseline ('herd before') runs at concurrency = slots only: its goal is about that load."""
        m = self.args.multipliers
        return [x for x in m if x == 1] or m[:1] if name == "baseline" else m

    def baseline_roles(self) -> Path:
        """The roles folder at --baseline-ref (git archive), for the 'before' row."""
        dest = self.work / "baseline"
        dest.mkdir(exist_ok=True)
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", self.args.baseline_ref, "roles"],
                              capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
        return dest / "roles"

    def section_litellm(self, gw: Gateway) -> dict:
        a = self.args
        exe = shutil.which("litellm", path=str(Path(sys.executable).parent)) if not a.skip_litellm else None
        if not exe:
            return {"status": "skipped", "reason": "--skip-litellm" if a.skip_litellm else "litellm not installed"}
        port = free_port()
        cfg = self.work / "litellm.yaml"
        lines = ["model_list:"]
        for q in self.ports:
            lines += [f"  - model_name: {MODEL}", "    litellm_params:", f"      model: openai/{MODEL}",
                      f"      api_base: http://{HOST}:{q}/v1", "      api_key: none"]
        lines += ["router_settings:", f"  routing_strategy: {a.litellm_routing}",
                  "litellm_settings:", "  telemetry: false", "  drop_params: true"]
        cfg.write_text("\n".join(lines) + "\n")
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
                   DISABLE_SCHEMA_UPDATE="true")
        self.procs.start("litellm", [exe, "--config", str(cfg), "--host", HOST, "--port", str(port),
                                     "--num_workers", "1"], env=env, log_path=self.work / "litellm.log")
        url = f"http://{HOST}:{port}"
        try:
            wait_http(url + "/health/liveliness", 120)
        except RuntimeError as exc:
            tail = (self.work / "litellm.log").read_text(errors="replace")[-1500:]
            self.procs.stop("litellm")
            return {"status": "failed", "reason": f"{exc}\n{tail}"}
        self.load("warm-litellm", url, "openai", 1, 2, "w:8:2", record=False)
        low = f"short:{a.prompt_words}:{a.short_tokens}"
        try:
            self.load("peer-direct-c1", f"http://{HOST}:{self.ports[0]}", "openai", 1, a.low_load_requests, low)
            self.load("peer-litellm-c1", url, "openai", 1, a.low_load_requests, low)
            self.load("peer-litellm-sat", url, "openai", self.slots, a.requests, self.mix())
        finally:
            self.procs.stop("litellm")
        gw.start("herd")
        try:
            self.load("peer-herd-c1", gw.url, "openai", 1, a.low_load_requests, low)
            self.load("peer-herd-sat", gw.url, "openai", self.slots, a.requests, self.mix())
        finally:
            gw.stop()
        version = cmd_out([sys.executable, "-c", "import importlib.metadata as m; print(m.version('litellm'))"])
        return {"status": "ran", "version": version, "routing_strategy": a.litellm_routing,
                "config": cfg.read_text()}


# ---------------------------------------------------------------- report


def machine_facts() -> dict:
    mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return {
        "nproc": os.cpu_count(),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": cmd_out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python_load_tool": cmd_out(["python3", "--version"]),
        "python_bench": platform.python_version(),
        "nginx": cmd_out(["nginx", "-v"]).replace("nginx version: nginx/", ""),
        "emulator": cmd_out([sys.executable, str(EMULATOR), "--version"]).splitlines()[-1:] or ["?"],
        "herd_commit": cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "herd_dirty": bool(cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])),
    }


def request_list(run: dict, classes: dict[str, int]) -> list[int]:
    """Answer lengths of a run's requests in the order they were issued."""
    samples = sorted(run["samples"], key=lambda s: s["index"])
    return [classes[s["cls"]] for s in samples]


def row(summary: dict, slots: int, token_s: float) -> dict:
    errs = dict(summary["errors_by_status"])
    capacity = slots / token_s  # tokens/s with every slot streaming
    return {
        "requests": summary["requests"], "served": summary["ok"], "busy_503": errs.pop("http_503", 0),
        "other_errors": errs, "tok_per_s": summary["output_tokens_per_s"],
        "scaling": ratio(summary["output_tokens_per_s"], capacity),
        "ttft_p50": summary["ttft_s"]["p50"], "ttft_p99": summary["ttft_s"]["p99"],
        "latency_p50": summary["latency_s"]["p50"], "latency_p99": summary["latency_s"]["p99"],
        "wall_s": summary["wall_s"],
    }


def goals(tab: dict, mults: list[int], ttft: dict) -> list[tuple[str, str, bool | None]]:
    """The issue's goals: (goal, measured, met)."""
    out = []
    h = {m: tab[m].get("herd") for m in mults}
    if not all(h.values()):
        return out
    ideal = {m: tab[m]["ideal"] for m in mults}
    if 3 in mults and h[3]:
        r = ratio(h[3]["ttft_p99"], ideal[3]["ttft_p99"])
        out.append(("3x slots: 240/240 served" if h[3]["requests"] == 240 else "3x slots: every request served",
                    f"{h[3]['served']}/{h[3]['requests']}", h[3]["served"] == h[3]["requests"]))
        out.append(("3x slots: TTFT p99 within 1.15x of the ideal",
                    f"{fmt(h[3]['ttft_p99'])} s vs ideal {fmt(ideal[3]['ttft_p99'])} s = {fmt(r, 2)}x",
                    r is not None and r <= 1.15))
        out.append(("3x slots: scaling >= 0.93",
                    f"{fmt(h[3]['scaling'])} (the ideal FIFO on this request list: {fmt(ideal[3]['scaling'])}; herd = "
                    f"{fmt(ratio(h[3]['scaling'], ideal[3]['scaling']), 3)} of it)",
                    h[3]["scaling"] is not None and h[3]["scaling"] >= 0.93))
    if 2 in mults and h[2]:
        r = ratio(h[2]["ttft_p99"], ideal[2]["ttft_p99"])
        out.append(("2x slots: TTFT p99 within 1.15x of the ideal",
                    f"{fmt(h[2]['ttft_p99'])} s vs ideal {fmt(ideal[2]['ttft_p99'])} s = {fmt(r, 2)}x",
                    r is not None and r <= 1.15))
    if 1 in mults and h[1] and tab[1].get("seed-000"):
        s0 = tab[1]["seed-000"]["scaling"]
        out.append(("concurrency = slots: scaling at least seed 000's",
                    f"herd {fmt(h[1]['scaling'])}, seed 000 {fmt(s0)}",
                    h[1]["scaling"] is not None and s0 is not None and h[1]["scaling"] >= s0))
    if ttft.get("direct") and ttft.get("gateway"):
        g, d = ttft["gateway"]["ttft_p99"], ttft["direct"]["ttft_p99"]
        d99 = 1000 * (g - d) if g is not None and d is not None else None
        out.append(("concurrency = slots: TTFT overhead over direct <= 2 ms p99",
                    f"{fmt(d99, 2)} ms (gateway {fmt(g)} s, direct {fmt(d)} s)", d99 is not None and d99 <= 2.0))
    if 1 in mults and tab[1].get("baseline"):
        b = tab[1]["baseline"]
        r = ratio(h[1]["tok_per_s"], b["tok_per_s"])
        out.append(("queue costs nothing at concurrency = slots: within 2% of the gateway before",
                    f"throughput {fmt(r, 3)}x of before; TTFT p99 {fmt(h[1]['ttft_p99'])} s vs "
                    f"{fmt(b['ttft_p99'])} s", r is not None and r >= 0.98))
    return out


def affinity_goals(tab: dict, mults: list[int], chat: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 20's goals: multi-turn TTFT/throughput/p99 with affinity vs without, single-turn no loss, bound."""
    out = []
    on, off = chat.get("herd"), chat.get("herd-noaff")
    if on and off:
        r = ratio(on["ttft_s"]["p50"], off["ttft_s"]["p50"])
        out.append(("multi-turn: TTFT p50 <= 0.5x least loaded's",
                    f"{fmt(on['ttft_s']['p50'])} s vs {fmt(off['ttft_s']['p50'])} s = {fmt(r, 2)}x",
                    r is not None and r <= 0.5))
        r = ratio(on["output_tokens_per_s"], off["output_tokens_per_s"])
        out.append(("multi-turn: throughput at least least loaded's",
                    f"{fmt(on['output_tokens_per_s'], 1)} vs {fmt(off['output_tokens_per_s'], 1)} tok/s = {fmt(r, 3)}x",
                    r is not None and r >= 1.0))
        out.append(("multi-turn: TTFT p99 no worse",
                    f"{fmt(on['ttft_s']['p99'])} s vs {fmt(off['ttft_s']['p99'])} s",
                    on["ttft_s"]["p99"] is not None and off["ttft_s"]["p99"] is not None
                    and on["ttft_s"]["p99"] <= off["ttft_s"]["p99"]))
        over = [f"{k} {v['peak']}/{v['max_conns']}" for run in (on, off) for k, v in run["peak_inflight"].items()
                if v["peak"] > v["max_conns"]]
        peaks = max((v["peak"] for run in (on, off) for v in run["peak_inflight"].values()), default=None)
        out.append(("no instance ever holds more than its max_conns",
                    "over: " + ", ".join(over) if over else f"most in flight on one instance: {peaks} "
                    f"(max_conns {max((v['max_conns'] for v in on['peak_inflight'].values()), default='-')})",
                    not over and peaks is not None))
    for m in mults:
        h, n = tab[m].get("herd"), tab[m].get("herd-noaff")
        if h and n:
            r = ratio(h["tok_per_s"], n["tok_per_s"])
            out.append((f"single-turn, {m}x slots: affinity on within 2% of off",
                        f"throughput {fmt(r, 3)}x; TTFT p99 {fmt(h['ttft_p99'])} s vs {fmt(n['ttft_p99'])} s",
                        r is not None and r >= 0.98))
    return out


def fleet_goals(tab: dict, mults: list[int], fleet: dict) -> list[tuple[str, str, bool | None]]:
    """Issue 31's goals: the agent fleet through prefix routing against least loaded (and conversation affinity,
    reported), never past max_conns; the single-turn sections within 2% of least loaded."""
    out = []
    on, off, conv = fleet.get("herd"), fleet.get("herd-noaff"), fleet.get("herd-conv")
    if on and off:
        r = ratio(on["ttft_s"]["p90"], off["ttft_s"]["p90"])
        rc = ratio(on["ttft_s"]["p90"], conv["ttft_s"]["p90"]) if conv else None
        out.append(("agent fleet: TTFT p90 <= 0.3x least loaded's",
                    f"{fmt(on['ttft_s']['p90'])} s vs {fmt(off['ttft_s']['p90'])} s = {fmt(r, 2)}x (conversation "
                    f"affinity: {fmt(conv['ttft_s']['p90']) if conv else '-'} s, {fmt(rc, 2)}x of it)",
                    r is not None and r <= 0.3))
        r = ratio(on["output_tokens_per_s"], off["output_tokens_per_s"])
        rc = ratio(on["output_tokens_per_s"], conv["output_tokens_per_s"]) if conv else None
        out.append(("agent fleet: output throughput >= 1.2x least loaded's",
                    f"{fmt(on['output_tokens_per_s'], 1)} vs {fmt(off['output_tokens_per_s'], 1)} tok/s = "
                    f"{fmt(r, 3)}x ({fmt(rc, 3)}x conversation affinity's)", r is not None and r >= 1.2))
        runs = [run for run in (on, off, conv) if run]
        over = [f"{k} {v['peak']}/{v['max_conns']}" for run in runs for k, v in run["peak_inflight"].items()
                if v["peak"] > v["max_conns"]]
        peaks = max((v["peak"] for run in runs for v in run["peak_inflight"].values()), default=None)
        out.append(("agent fleet: no instance ever above its max_conns",
                    "over: " + ", ".join(over) if over else f"most in flight on one instance: {peaks}",
                    not over and peaks is not None))
        # where the p90 comes from: each session's first turn finds at most its agent's prefix (and in the burst
        # of new sessions not even that), its later turns their history too
        r = ratio(on["ttft_follow_s"]["p90"], off["ttft_follow_s"]["p90"])
        out.append(("agent fleet: TTFT p90 of the turns after each session's first, against least loaded's (reported)",
                    f"{fmt(on['ttft_follow_s']['p90'])} s vs {fmt(off['ttft_follow_s']['p90'])} s = {fmt(r, 2)}x; "
                    f"first turns {fmt(on['ttft_first_s']['p90'])} s vs "
                    f"{fmt(off['ttft_first_s']['p90'])} s", None))
        shares = ", ".join(f"{LABELS[n]} {fmt(cache_share(run), 2)}" for n, run in
                           (("herd", on), ("herd-conv", conv), ("herd-noaff", off)) if run)
        out.append(("agent fleet: share of prompt tokens served from cache (reported)", shares, None))
    mon, moff = fleet.get("herd-mu"), fleet.get("herd-noaff-mu")
    if mon and moff:
        r = ratio(mon["ttft_s"]["p90"], moff["ttft_s"]["p90"])
        out.append(("agent fleet, Ollama 0.3.13-0.29 with OLLAMA_MULTIUSER_CACHE=1: TTFT p90 <= 0.3x least loaded's",
                    f"{fmt(mon['ttft_s']['p90'])} s vs {fmt(moff['ttft_s']['p90'])} s = {fmt(r, 2)}x",
                    r is not None and r <= 0.3))
        r = ratio(mon["output_tokens_per_s"], moff["output_tokens_per_s"])
        out.append(("agent fleet, Ollama 0.3.13-0.29 with OLLAMA_MULTIUSER_CACHE=1: output throughput >= 1.2x "
                    "least loaded's",
                    f"{fmt(mon['output_tokens_per_s'], 1)} vs {fmt(moff['output_tokens_per_s'], 1)} tok/s = {fmt(r, 3)}x",
                    r is not None and r >= 1.2))
        over = [f"{k} {v['peak']}/{v['max_conns']}" for run in (mon, moff) for k, v in run["peak_inflight"].items()
                if v["peak"] > v["max_conns"]]
        out.append(("agent fleet, Ollama 0.3.13-0.29 with OLLAMA_MULTIUSER_CACHE=1: no instance ever above its "
                    "max_conns",
                    "over: " + ", ".join(over) if over else "none over", not over))
    for m in mults:
        h, n = tab[m].get("herd"), tab[m].get("herd-noaff")
        if h and n:
            r = ratio(h["tok_per_s"], n["tok_per_s"])
            out.append((f"single-turn, {m}x slots: prefix routing within 2% of least loaded",
                        f"throughput {fmt(r, 3)}x", r is not None and r >= 0.98))
    return out


def cache_share(run: dict) -> float | None:
    """Share of the prompt tokens sent that the instances found in their prompt caches (not evaluated)."""
    sent = run.get("prompt_tokens_sent") or 0
    return 1 - run["prompt_tokens_evaluated"] / sent if sent else None


def fleet_report(fleet: dict, a, checks) -> list[str]:
    """Section 7's lines."""
    on = fleet.get("herd") or {}
    L = ["## 7. Agent fleet: prefix routing vs conversation affinity vs least loaded", ""]
    L.append(f"The instances restarted before each run (empty prompt caches), with the emulator's timing model: "
             f"prompt evaluation at {a.chat_prompt_tps:g} tokens/s (an 8B model by the emulator's K / parameters) "
             "that holds up the other slots of the instance while it runs, decode slowed by the batch curve. "
             f"{a.fleet_agents} agent types, each with its own prefix of {a.fleet_prefix_bytes} bytes (instructions "
             f"and tool definitions, sent as the system prompt of every turn); {a.fleet_sessions} sessions (agent "
             f"types in turn) of {a.fleet_turns} turns: a task of {a.fleet_task_bytes} bytes, then tool results of "
             f"{a.fleet_tool_bytes} bytes, the whole history every turn over streaming `/api/chat`, "
             f"{a.fleet_think_s:g} s (0.5x-1.5x) between an answer and the next turn (the tool runs), answers of "
             f"{a.fleet_answer_tokens} tokens; {a.fleet_clients or '1.5x the slots'} sessions at once (more than "
             f"slots; starting spread over {a.fleet_ramp_s:g} s; histories up to "
             f"{on.get('max_history_tokens', '-')} tokens). Three gateways rendered by the "
             "role: `gateway_affinity` prefix (the default), conversation (herd's rule before prefix routing) and "
             "off (least loaded), the instances as Ollama 0.30+ (herd's default 0.34.2: llama-server, whose "
             "host-memory prompt cache keeps prompts that lost their slot, 8192 MiB per instance, docs/standins.md); "
             "then prefix routing and least loaded again with the instances as Ollama 0.3.13-0.29 with "
             "`OLLAMA_MULTIUSER_CACHE=1`, which herd's planner sets on those releases (`ollama_multiuser_cache`: when "
             "the slot holding a prompt's longest prefix is busy, the runner copies that prefix into a free slot; "
             "nothing is kept past the slots; the emulator does as Ollama's findBestCacheSlot does), prefix routing "
             "rendered with `gateway_prefix_host_cache_bytes: 0` as docs/gateway.md says for those releases.")
    L.append("")
    L.append("| configuration | served | TTFT p50 | TTFT p90 | TTFT p99 | TTFT p90, first turns | TTFT p90, later "
             "turns | output tok/s | prompt tokens from cache | turns on the last turn's instance | most in flight per "
             "instance (max_conns) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("herd", "herd-conv", "herd-noaff", "herd-mu", "herd-noaff-mu"):
        v = fleet.get(name)
        if not v:
            continue
        peak = max((x["peak"] for x in v["peak_inflight"].values()), default="-")
        conns = max((x["max_conns"] for x in v["peak_inflight"].values()), default="-")
        L.append(f"| {LABELS[name]} | {v['ok']}/{v['requests']} | {fmt(v['ttft_s']['p50'])} s | "
                 f"{fmt(v['ttft_s']['p90'])} s | {fmt(v['ttft_s']['p99'])} s | "
                 f"{fmt(v['ttft_first_s']['p90'])} s | {fmt(v['ttft_follow_s']['p90'])} s | "
                 f"{fmt(v['output_tokens_per_s'], 1)} | "
                 f"{fmt(100 * (cache_share(v) or 0), 1)}% | {v['same_instance_as_last_turn']}/{v['follow_up_turns']} | "
                 f"{peak} ({conns}) |")
    L.append("")
    try:
        (pool,) = json.loads(on["herd_pools"]["body"])["pools"]
        hist = pool.get("prefix_hit_bytes") or {}
        count = hist.get("count") or 0
        L.append(f"The gateway's counters after the prefix-routing run (`/herd/pools`): hits {pool.get('affinity_hits')}, "
                 f"misses {pool.get('affinity_misses')}, new {pool.get('affinity_new')}; prompt bytes found cached "
                 f"where each request went: mean {fmt((hist.get('sum') or 0) / count if count else None, 0)} over "
                 f"{count} requests (histogram `herd_gateway_pool_prefix_hit_bytes`).")
        L.append("")
    except (ValueError, KeyError, TypeError):
        pass
    return L + goals_table(31, checks)


def goals_table(issue, checks):
    """Markdown lines of an issue's goals: (goal, measured, met) rows."""
    lines = [f"### The issue's goals (issue {issue}), from this run", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g} | {v} | {'-' if ok is None else 'yes' if ok else 'NO'} |" for g, v, ok in checks]
    return lines + [""]


def build_report(bench: Bench, extra: dict, facts: dict, command: str, started: str, took: float) -> tuple[str, dict]:
    a = bench.args
    n, p, slots = a.instances, a.num_parallel, bench.slots
    classes = {"short": a.short_tokens, "long": a.long_tokens}
    # A slot's time per token with every slot of its instance generating (the emulator's batch curve): what the
    # ideal FIFO and the capacity (scaling) are computed with.
    busy_token_s = a.token_seconds * step_ratio(p)
    tab: dict[int, dict[str, dict]] = {}
    reference = None
    for m in a.multipliers:
        tab[m] = {}
        for name in a.configs:
            if m not in bench.multipliers(name):
                continue
            run = bench.runs[f"{name}-x{m}"]
            tab[m][name] = row(run["summary"], slots, busy_token_s)
            rl = request_list(run, classes)
            if reference is None:
                reference = rl
            elif rl != reference:
                raise RuntimeError(f"run {name}-x{m} sent another request list than the first run")
        sim = ideal_fifo(reference, slots * m, slots, busy_token_s)
        tab[m]["ideal"] = row(sim, slots, busy_token_s)
    longs = sum(1 for t in reference if t == a.long_tokens)
    ttft = {}
    for k in ("direct", "gateway"):
        if f"ttft-{k}" in bench.runs:
            s = bench.runs[f"ttft-{k}"]["summary"]
            ttft[k] = {"ttft_p50": s["ttft_s"]["p50"], "ttft_p99": s["ttft_s"]["p99"],
                       "latency_p50": s["latency_s"]["p50"], "ok": s["ok"], "requests": s["requests"]}
    peer = dict(extra["litellm"])
    if peer.get("status") == "ran":
        for k in ("direct-c1", "litellm-c1", "herd-c1", "litellm-sat", "herd-sat"):
            peer[k] = row(bench.runs[f"peer-{k}"]["summary"], slots, busy_token_s)
    checks = goals(tab, a.multipliers, ttft)
    chat = extra.get("chat") or {}
    aff_checks = affinity_goals(tab, a.multipliers, chat)
    fleet = extra.get("fleet") or {}
    fleet_checks = fleet_goals(tab, a.multipliers, fleet) if fleet else []
    if "ttft-gateway-noacct" in bench.runs:
        s = bench.runs["ttft-gateway-noacct"]["summary"]
        ttft["gateway-noacct"] = {"ttft_p50": s["ttft_s"]["p50"], "ttft_p99": s["ttft_s"]["p99"],
                                  "latency_p50": s["latency_s"]["p50"], "ok": s["ok"], "requests": s["requests"]}
    noisy_checks = noisy_goals(extra.get("noisy"))
    out = {"overload": {str(m): v for m, v in tab.items()}, "noisy": extra.get("noisy"),
           "noisy_goals": [{"goal": g, "measured": v, "met": ok} for g, v, ok in noisy_checks],
           "accounting": accounting_figures(bench), "request_list": {"requests": len(reference),
           "long": longs, "short": len(reference) - longs}, "ttft": ttft, "peer_router": peer,
           "goals": [{"goal": g, "measured": v, "met": ok} for g, v, ok in checks],
           "chat": chat, "affinity_goals": [{"goal": g, "measured": v, "met": ok} for g, v, ok in aff_checks],
           "fleet": fleet, "fleet_goals": [{"goal": g, "measured": v, "met": ok} for g, v, ok in fleet_checks],
           "facts": facts, "command": command, "started": started, "took_s": took, "settings": vars(a),
           "cpu": bench.cpu, "gateway_origin": extra.get("gateway_origin"), "rendered_files": extra["files"],
           "note": a.note, "herd_pools": extra.get("herd_pools"),
           "runs": {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in bench.runs.items()}}

    L = []
    L.append(f"# herd gateway benchmark, lab, {started[:10]}")
    L.append("")
    L.append("**Backends are emulated.** Every instance is herd's Ollama emulator "
             "(`lab/standins/ollama_emulator.py`), not a GPU: each slot streams tokens at the emulator's rate "
             f"({1000 * a.token_seconds:g} ms per token alone, {1000 * busy_token_s:.2f} ms with all {p} slots of the "
             f"instance generating: the emulator's measured batch curve, docs/standins.md \"Timing model\"; no "
             "prompt time in sections 1-3, an 8B model's prefill in sections 4 and 7). "
             "The numbers measure herd's gateway (nginx config, balancing and queueing) and the load tool, not "
             "model speed. All figures come from this one run on a shared machine.")
    L.append("")
    if a.note:
        L.append(f"**Note:** {a.note}")
        L.append("")
    L.append(f"Made with (from the repository root, as root, on Debian/Ubuntu), at herd commit "
             f"`{facts['herd_commit']}`{' (with uncommitted changes)' if facts['herd_dirty'] else ''}:")
    L.append("")
    L.append("```sh")
    L.append(command)
    L.append("```")
    L.append("")
    L.append("## Setup")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    L.append(f"| machine | {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory_gib']} GiB, "
             f"kernel {facts['kernel']}, {facts['os']} |")
    L.append(f"| versions | nginx {facts['nginx']}, load tool on {facts['python_load_tool']}, bench on Python "
             f"{facts['python_bench']}, emulator `{facts['emulator'][0]}`, LiteLLM {peer.get('version', '-')} |")
    origin = extra.get("gateway_origin") or "-"
    files = ", ".join(f"`{f}`" for f in extra["files"].get("herd", []))
    L.append(f"| herd's gateway | rendered by {origin} itself (benchmarks/render_gateway.yml runs the role's main "
             "entry point without its package and service tasks) into a private prefix: "
             f"{files}; this machine's nginx.conf (worker_processes {a.nginx_workers or 'as installed'}) |")
    L.append("| seeds | one upstream over every instance with nginx's own balancing, zone, keepalive 32, "
             "proxy_buffering off (benchmarks/gateway_bench.py `seed_conf`) |")
    L.append(f"| instances | {n} emulator processes on 127.0.0.1, model `{MODEL}`, OLLAMA_NUM_PARALLEL={p} "
             f"({slots} slots) |")
    L.append(f"| load | tools/herd_load.py, closed loop, streaming `/api/generate`, {len(reference)} requests "
             f"(seed {a.seed}: {longs} ask {a.long_tokens} tokens, {len(reference) - longs} ask {a.short_tokens}); "
             "the same request list for every run |")
    L.append(f"| wall time | {took:.0f} s for the whole run |")
    L.append("")
    L.append("## 1. Overload: concurrency = slots, 2x and 3x")
    L.append("")
    L.append("Served = answered 200 with a complete stream. Scaling = output tokens/s / (slots x tokens/s of one "
             "slot): the share of the cluster's capacity used from the first request to the last answer. "
             "The ideal central FIFO is computed, not measured: the same request list, the same closed loop, "
             "one queue in arrival order, each request started on the first slot that frees, no overhead.")
    L.append("")
    L.append("| concurrency | configuration | served | 503 | other errors | scaling | TTFT p50 | TTFT p99 | "
             "TTFT p99 / ideal | latency p99 |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for m in a.multipliers:
        ideal = tab[m]["ideal"]
        for name in (*a.configs, "ideal"):
            if name not in tab[m]:
                continue
            v = tab[m][name]
            errs = ", ".join(f"{k}: {c}" for k, c in v["other_errors"].items()) or "0"
            L.append(f"| {slots * m} ({m}x) | {LABELS[name]} | {v['served']}/{v['requests']} | {v['busy_503']} | "
                     f"{errs} | {fmt(v['scaling'])} | {fmt(v['ttft_p50'])} s | {fmt(v['ttft_p99'])} s | "
                     f"{fmt(ratio(v['ttft_p99'], ideal['ttft_p99']), 2)} | {fmt(v['latency_p99'])} s |")
    L.append("")
    if checks:
        L += goals_table(15, checks)

    pools = extra.get("herd_pools")
    if pools:
        L.append(f"The gateway's own status after herd's runs (`GET /herd/pools`, HTTP {pools['status']}):")
        L.append("")
        try:
            for pool in json.loads(pools["body"]).get("pools", []):
                w = pool.get("wait_seconds", {})
                L.append(f"- pool `{pool.get('name')}`: admitted {pool.get('admitted')}, busy (queue full) "
                         f"{pool.get('rejected_full')}, busy (wait timeout) {pool.get('rejected_timeout')}, abandoned "
                         f"{pool.get('abandoned')}, queued now {pool.get('queued')}, waits counted {w.get('count')}, "
                         f"total wait {fmt(w.get('sum'), 1)} s")
        except (ValueError, AttributeError):
            L.append(f"- not the pool JSON: `{pools['body'][:200]}`")
        L.append("")
    if ttft:
        L.append("## 2. Streaming: time to first token, gateway vs direct")
        L.append("")
        L.append(f"Concurrency = slots ({slots}), {a.ttft_requests} requests of {a.short_tokens} tokens, so no request "
                 f"has to wait for a slot. Direct: {p} clients on each of the {n} instances at once (its own load "
                 f"tool each); gateway: {slots} clients through herd's gateway. The difference is what the gateway "
                 "adds, on this shared machine's noise.")
        L.append("")
        L.append("| path | TTFT p50 | TTFT p99 | latency p50 | served |")
        L.append("|---|---|---|---|---|")
        for k, label in (("direct", "direct to the instances"), ("gateway", "herd gateway")):
            if k in ttft:
                v = ttft[k]
                L.append(f"| {label} | {fmt(v['ttft_p50'])} s | {fmt(v['ttft_p99'])} s | {fmt(v['latency_p50'])} s | "
                         f"{v['ok']}/{v['requests']} |")
        if "direct" in ttft and "gateway" in ttft:
            d50 = 1000 * (ttft["gateway"]["ttft_p50"] - ttft["direct"]["ttft_p50"])
            d99 = 1000 * (ttft["gateway"]["ttft_p99"] - ttft["direct"]["ttft_p99"])
            L.append("")
            L.append(f"The gateway adds {d50:.2f} ms to TTFT p50 and {d99:.2f} ms to TTFT p99.")
        L.append("")

    L.append("## 3. Peer router: LiteLLM proxy vs herd's gateway")
    L.append("")
    if peer.get("status") != "ran":
        L.append(f"Skipped: {peer.get('status')}: {peer.get('reason')}")
    else:
        L.append(f"Same {n} instances behind LiteLLM {peer['version']} (`litellm --config`, routing "
                 f"`{peer['routing_strategy']}`, OpenAI provider to each instance's `/v1`, 1 worker) and behind herd's "
                 f"gateway; streaming `/v1/chat/completions`. Low load: 1 client, {a.low_load_requests} requests of "
                 f"{a.short_tokens} tokens. Saturation: concurrency {slots} (= slots), the request list of section 1.")
        L.append("")
        L.append("| path | TTFT p50 (1 client) | latency p50 (1 client) | served saturated | scaling saturated | "
                 "TTFT p99 saturated | latency p99 saturated |")
        L.append("|---|---|---|---|---|---|---|")
        d = peer["direct-c1"]
        L.append(f"| direct to one instance | {fmt(d['ttft_p50'])} s | {fmt(d['latency_p50'])} s | - | - | - | - |")
        for k, label in (("herd", "herd gateway"), ("litellm", "LiteLLM proxy")):
            lo, hi = peer[f"{k}-c1"], peer[f"{k}-sat"]
            L.append(f"| {label} | {fmt(lo['ttft_p50'])} s | {fmt(lo['latency_p50'])} s | "
                     f"{hi['served']}/{hi['requests']} | {fmt(hi['scaling'])} | {fmt(hi['ttft_p99'])} s | "
                     f"{fmt(hi['latency_p99'])} s |")
        added_l = 1000 * (peer["litellm-c1"]["ttft_p50"] - d["ttft_p50"]) if peer["litellm-c1"]["ttft_p50"] else None
        added_h = 1000 * (peer["herd-c1"]["ttft_p50"] - d["ttft_p50"]) if peer["herd-c1"]["ttft_p50"] else None
        L.append("")
        L.append(f"Added TTFT p50 over a direct call: herd {fmt(added_h, 2)} ms, LiteLLM {fmt(added_l, 2)} ms.")
        lc, hc = bench.cpu.get("peer-litellm-sat", {}), bench.cpu.get("peer-herd-sat", {})
        if lc and hc:
            L.append(f"CPU while saturated: LiteLLM's proxy {lc['litellm_cpu_s']:.1f} CPU s in {lc['elapsed_s']:.0f} s, "
                     f"nginx {hc['nginx_cpu_s']:.2f} CPU s in {hc['elapsed_s']:.0f} s (a shared 2-core machine: read "
                     "LiteLLM's figures as its cost in this setup, not its speed on a dedicated host).")
    L.append("")

    if chat:
        on = chat.get("herd")
        L.append("## 4. Multi-turn chat: cache affinity on vs off")
        L.append("")
        L.append(f"The instances restarted with emulated prompt evaluation at {a.chat_prompt_tps:g} tokens/s "
                 "and the emulator's per-slot prompt cache (Ollama's runner: a request takes the free slot whose "
                 "last prompt shares the longest prefix with it; only the tokens not cached cost prompt time; "
                 f"docs/standins.md). {a.chat_conversations} conversations x {a.chat_turns} turns, "
                 f"{a.chat_clients or slots} clients at once, each sending its conversation's turns over streaming "
                 f"`/api/chat` with the whole history, {a.chat_think_s:g} s (0.5x-1.5x) after each answer (the user "
                 f"reads and types, and other conversations use the slot meanwhile): a shared system prompt of "
                 f"{a.chat_system_bytes} bytes, a first message of {a.chat_doc_bytes} bytes, follow-ups of "
                 f"{a.chat_turn_bytes} bytes, answers of {a.chat_answer_tokens} tokens (histories up to "
                 f"{on['max_history_tokens'] if on else '-'} tokens). Both runs: herd's gateway rendered by the role, "
                 "`gateway_affinity` prefix (herd, the default) and off (least loaded). The instances restarted "
                 "before each run (empty prompt caches).")
        L.append("")
        L.append("| configuration | served | TTFT p50 | TTFT p99 | TTFT p50, turns 2+ | latency p50 | output tok/s | "
                 "follow-ups on the last turn's instance | prompt tokens evaluated / sent | most in flight per "
                 "instance (max_conns) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for name in ("herd", "herd-noaff"):
            v = chat.get(name)
            if not v:
                continue
            peak = max((x["peak"] for x in v["peak_inflight"].values()), default="-")
            conns = max((x["max_conns"] for x in v["peak_inflight"].values()), default="-")
            L.append(f"| {LABELS[name]} | {v['ok']}/{v['requests']} | {fmt(v['ttft_s']['p50'])} s | "
                     f"{fmt(v['ttft_s']['p99'])} s | {fmt(v['ttft_follow_s']['p50'])} s | {fmt(v['latency_s']['p50'])} s | "
                     f"{fmt(v['output_tokens_per_s'], 1)} | {v['same_instance_as_last_turn']}/{v['follow_up_turns']} | "
                     f"{v['prompt_tokens_evaluated']} / {v['prompt_tokens_sent']} | {peak} ({conns}) |")
        L.append("")
        if on:
            try:
                (pool,) = json.loads(on["herd_pools"]["body"])["pools"]
                L.append(f"The gateway's affinity counters after the herd run (`/herd/pools`, counted since its nginx "
                         f"started for this run): hits {pool.get('affinity_hits')}, misses {pool.get('affinity_misses')}, "
                         f"new {pool.get('affinity_new')}.")
                L.append("")
            except (ValueError, KeyError, TypeError):
                pass
    if aff_checks:
        L += goals_table(20, aff_checks)
    noisy = extra.get("noisy")
    if noisy:
        L += noisy_report(noisy, a)
    if "ttft-gateway-noacct" in bench.runs:
        L += accounting_report(bench, ttft)
    if fleet:
        L += fleet_report(fleet, a, fleet_checks)

    L.append("## CPU use (is the machine the bottleneck?)")
    L.append("")
    busy_mean = sum(c["machine_busy"] for c in bench.cpu.values()) / max(len(bench.cpu), 1)
    L.append(f"CPU seconds of the benchmark's own processes per run ({facts['nproc']} CPUs). 'machine busy' counts "
             f"every user's work on this shared machine (mean {100 * busy_mean:.0f}% over the runs). The last column "
             "counts the requests each emulator logged during the run.")
    L.append("")
    L.append("| run | wall s | emulators CPU s | nginx CPU s | load tool CPU s | LiteLLM CPU s | machine busy | "
             "requests per instance |")
    L.append("|---|---|---|---|---|---|---|---|")
    for k, c in bench.cpu.items():
        L.append(f"| {k} | {c['elapsed_s']:.1f} | {c['emulators_cpu_s']:.2f} | {c['nginx_cpu_s']:.2f} | "
                 f"{c['load_tool_cpu_s']:.2f} | {c['litellm_cpu_s']:.2f} | {100 * c['machine_busy']:.0f}% | "
                 f"{' / '.join(str(x) for x in c['served_by_instance'])} |")
    L.append("")
    L.append(f"Raw results (every run's summary, per-instance spread, settings, the rendered files): "
             f"`{started[:10]}-lab.json`; plot: `{started[:10]}-lab.png`.")
    L.append("")
    return "\n".join(L), out


def noisy_goals(noisy: dict | None) -> list[tuple[str, str, bool | None]]:
    """Issue 30's goals for the noisy-neighbour section."""
    if not noisy:
        return []
    alone, fair, fifo = noisy["alone"], noisy["keys-fair"], noisy["keys-fifo"]
    checks = []
    r = ratio(fair["quiet"]["ttft_p90"], alone["ttft_p90"])
    checks.append(("the quiet key's TTFT p90 beside the noisy key is at most 2x its TTFT p90 alone",
                   f"{fmt(fair['quiet']['ttft_p90'])} s vs {fmt(alone['ttft_p90'])} s alone: {fmt(r, 2)}x",
                   None if r is None else r <= 2.0))
    r = ratio(fair["pool_tokens_per_s"], fifo["pool_tokens_per_s"])
    checks.append(("the pool's throughput with fair share is at least 0.95x plain FIFO's, same run",
                   f"{fmt(fair['pool_tokens_per_s'], 1)} vs {fmt(fifo['pool_tokens_per_s'], 1)} tok/s: {fmt(r, 3)}x",
                   None if r is None else r >= 0.95))
    return checks


def noisy_report(noisy: dict, a) -> list[str]:
    L = ["## 5. Noisy neighbour: two API keys in one full pool", ""]
    L.append(f"One instance's pool ({noisy['slots']} slots), answers of {noisy['answer_tokens']} tokens "
             f"({fmt(noisy['answer_s'], 2)} s). Key `noisy` keeps {noisy['noisy_clients']} streaming clients busy for "
             f"{noisy['seconds']:g} s; key `quiet` sends {noisy['quiet_requests']} requests one at a time, first alone, "
             "then beside the noise, through herd's gateway rendered by the role with fair share (the default) and "
             "with `gateway_fair_share: false` (one FIFO per pool, as before issue 30). Pool throughput: both keys' "
             "output tokens over the time from the noisy key's start until both keys' runs ended.")
    L.append("")
    L.append("| gateway | quiet: served | quiet TTFT p50 | quiet TTFT p90 | quiet TTFT max | noisy: served | "
             "noisy tok/s | pool tok/s |")
    L.append("|---|---|---|---|---|---|---|---|")
    al = noisy["alone"]
    L.append(f"| quiet key alone | {al['ok']}/{al['requests']} | {fmt(al['ttft_p50'])} s | {fmt(al['ttft_p90'])} s | "
             f"{fmt(al['ttft_max'])} s | - | - | - |")
    for name in ("keys-fair", "keys-fifo"):
        v = noisy[name]
        q, n = v["quiet"], v["noisy"]
        L.append(f"| {LABELS[name]} | {q['ok']}/{q['requests']} | {fmt(q['ttft_p50'])} s | {fmt(q['ttft_p90'])} s | "
                 f"{fmt(q['ttft_max'])} s | {n['ok']}/{n['requests']} | {fmt(n['output_tokens_per_s'], 1)} | "
                 f"{fmt(v['pool_tokens_per_s'], 1)} |")
    L.append("")
    lines = []
    for name in ("keys-fair", "keys-fifo"):
        for key, v in sorted((noisy[name].get("waits") or {}).items()):
            w = v["wait"]
            lines.append(f"{LABELS[name]}, key `{key}`: {v['waited_10ms']} of {w['count']} requests waited 10 ms or "
                         f"more, wait p50 {fmt(w['p50'])} s, p90 {fmt(w['p90'])} s, max {fmt(w['max'])} s")
    if lines:
        L.append("Queue waits from each gateway's access log (`queue_wait`):")
        L.append("")
        L += [f"- {line}" for line in lines]
        L.append("")
        L.append("With fair share the quiet key's share of the pool is one slot of two and the noisy key holds more "
                 "than its own, so each slot that frees while the quiet key waits goes to it: it waits only when it "
                 "finds every slot busy, for the first to free (no slot is taken back from an answer in progress), "
                 "and then keeps its share as its next request arrives. In one FIFO it waits behind every noisy "
                 "request queued before it.")
        L.append("")
    L += goals_table(30, noisy_goals(noisy))
    return L


def accounting_figures(bench: Bench) -> dict | None:
    on, off = bench.cpu.get("ttft-gateway"), bench.cpu.get("ttft-gateway-noacct")
    if not on or not off:
        return None
    son, soff = bench.runs["ttft-gateway"]["summary"], bench.runs["ttft-gateway-noacct"]["summary"]
    direct = bench.runs.get("ttft-direct", {}).get("summary")
    fig = {"requests": son["requests"], "nginx_cpu_ms_per_request": {
        "on": 1000 * on["nginx_cpu_s"] / max(son["requests"], 1),
        "off": 1000 * off["nginx_cpu_s"] / max(soff["requests"], 1)},
        "latency_p50": {"on": son["latency_s"]["p50"], "off": soff["latency_s"]["p50"]},
        "ttft_p50": {"on": son["ttft_s"]["p50"], "off": soff["ttft_s"]["p50"]}}
    if direct:
        fig["added_latency_p50_ms"] = {k: 1000 * (fig["latency_p50"][k] - direct["latency_s"]["p50"])
                                       for k in ("on", "off")}
    return fig


def accounting_report(bench: Bench, ttft: dict) -> list[str]:
    fig = accounting_figures(bench)
    cpu = fig["nginx_cpu_ms_per_request"]
    L = ["## 6. The cost of token accounting", ""]
    L.append(f"Section 2's gateway run ({fig['requests']} streaming requests at concurrency = slots) again through "
             "herd's gateway rendered with `gateway_token_accounting: false`, right after it: the body filter then "
             "reads no chunk for usage.")
    L.append("")
    L.append("| gateway | nginx CPU per request | TTFT p50 | latency p50 | latency p50 added over direct |")
    L.append("|---|---|---|---|---|")
    added = fig.get("added_latency_p50_ms", {})
    for k, label in (("on", "accounting on (default)"), ("off", "accounting off")):
        L.append(f"| {label} | {fmt(cpu[k], 3)} ms | {fmt(fig['ttft_p50'][k])} s | {fmt(fig['latency_p50'][k])} s | "
                 f"{fmt(added.get(k), 2)} ms |")
    L.append("")
    L.append(f"Ratio on / off: nginx CPU per request {fmt(ratio(cpu['on'], cpu['off']), 2)}x, latency p50 "
             f"{fmt(ratio(fig['latency_p50']['on'], fig['latency_p50']['off']), 3)}x. The added latency is within this "
             "machine's noise (a difference of a fraction of a millisecond either way), so no ratio of it is given.")
    L.append("")
    return L


def write_plot(bench: Bench, data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    a = bench.args
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    ax = axes[0]
    xs = [bench.slots * m for m in a.multipliers]
    for name in (*a.configs, "ideal"):
        pts = [(bench.slots * m, data["overload"][str(m)][name]["ttft_p99"]) for m in a.multipliers
               if name in data["overload"][str(m)]]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", linestyle="--" if name == "ideal" else "-",
                label=name)
    ax.set_title("TTFT p99 by concurrency")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("seconds")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    top = max(a.multipliers)
    for name in a.configs:
        run = bench.runs.get(f"{name}-x{top}")
        if not run:
            continue
        vals = sorted(s["ttft"] for s in run["samples"] if s["ok"] and s["ttft"] is not None)
        if vals:
            ax.plot(vals, [(i + 1) / run["summary"]["requests"] for i in range(len(vals))], label=name)
    ax.set_title(f"TTFT CDF at {top}x slots (curves end at the share served)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle("herd gateway benchmark, lab, emulated backends")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true",
                   help="quick pass for make unit: 2 instances, 2 ms/token, 24 requests, 1x and 3x, 24 TTFT "
                        "requests, no LiteLLM, report under --out")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), help="report folder")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp dir)")
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--num-parallel", type=int, default=2, help="OLLAMA_NUM_PARALLEL (slots) of each instance")
    p.add_argument("--token-seconds", type=float, default=0.01, help="emulated seconds per token per slot")
    p.add_argument("--requests", type=int, default=240, help="requests of every overload run")
    p.add_argument("--multipliers", default="1,2,3", help="concurrency = slots x each of these")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"configurations to run, from {', '.join(CONFIGS)}, baseline (needs --baseline-ref)")
    p.add_argument("--baseline-ref", default=None, help="git ref whose role gateway is run as 'baseline'")
    p.add_argument("--prompt-words", type=int, default=8)
    p.add_argument("--short-tokens", type=int, default=20)
    p.add_argument("--long-tokens", type=int, default=200)
    p.add_argument("--short-weight", type=int, default=3, help="short requests per --long-weight long ones")
    p.add_argument("--long-weight", type=int, default=1)
    p.add_argument("--seed", type=int, default=1, help="seed of the request list (herd_load --seed)")
    p.add_argument("--ttft-requests", type=int, default=480, help="requests of each TTFT run (0: no section 2)")
    p.add_argument("--low-load-requests", type=int, default=20, help="requests of the 1-client peer-router runs")
    p.add_argument("--chat-conversations", type=int, default=32, help="multi-turn section: conversations (0: none)")
    p.add_argument("--chat-turns", type=int, default=6, help="multi-turn section: turns per conversation")
    p.add_argument("--chat-clients", type=int, default=0, help="multi-turn section: clients at once (0: = slots)")
    p.add_argument("--chat-prompt-tps", type=float, default=PREFILL_8B,
                   help="multi-turn and agent sections: emulated prompt evaluation, tokens/s (uncached tokens only; "
                        "default: an 8B model's by the emulator's K / parameters)")
    p.add_argument("--chat-system-bytes", type=int, default=800, help="system prompt shared by every conversation")
    p.add_argument("--chat-doc-bytes", type=int, default=6000, help="first user message of each conversation")
    p.add_argument("--chat-turn-bytes", type=int, default=400, help="each follow-up user message")
    p.add_argument("--chat-answer-tokens", type=int, default=64, help="answer length of every turn")
    p.add_argument("--chat-think-s", type=float, default=1.0,
                   help="mean pause between an answer and the next turn (uniform 0.5x-1.5x, seeded)")
    p.add_argument("--fleet-sessions", type=int, default=48, help="agent-fleet section: sessions (0: none)")
    p.add_argument("--fleet-multiuser", action=argparse.BooleanOptionalAction, default=True,
                   help="agent-fleet section: also run prefix routing and least loaded with the instances as Ollama "
                        "0.3.13-0.29 with OLLAMA_MULTIUSER_CACHE=1")
    p.add_argument("--fleet-ramp-s", type=float, default=5.0,
                   help="agent-fleet section: the sessions at once start spread over this many seconds")
    p.add_argument("--samples-dir", default="",
                   help="write each multi-turn run's requests (sent, instance, TTFT, prompt tokens evaluated) as "
                        "DIR/<run>.json")
    p.add_argument("--fleet-agents", type=int, default=4, help="agent-fleet section: agent types (shared prefixes)")
    p.add_argument("--fleet-turns", type=int, default=6, help="agent-fleet section: turns per session")
    p.add_argument("--fleet-clients", type=int, default=0,
                   help="agent-fleet section: sessions at once (0: 1.5x the slots)")
    p.add_argument("--fleet-prefix-bytes", type=int, default=64000,
                   help="agent-fleet section: each agent type's instructions and tool definitions")
    p.add_argument("--fleet-task-bytes", type=int, default=2000, help="agent-fleet section: each session's task")
    p.add_argument("--fleet-tool-bytes", type=int, default=2000, help="agent-fleet section: each tool result")
    p.add_argument("--fleet-answer-tokens", type=int, default=64, help="agent-fleet section: answer length")
    p.add_argument("--fleet-think-s", type=float, default=2.0,
                   help="agent-fleet section: mean pause between an answer and the next turn (tool run)")
    p.add_argument("--noisy-seconds", type=float, default=20.0, help="noisy-neighbour section: seconds (0: none)")
    p.add_argument("--noisy-clients", type=int, default=16, help="noisy-neighbour section: the noisy key's clients")
    p.add_argument("--noisy-tokens", type=int, default=50, help="noisy-neighbour section: answer length of both keys")
    p.add_argument("--quiet-requests", type=int, default=30,
                   help="noisy-neighbour section: the quiet key's requests, one at a time")
    p.add_argument("--nginx-workers", default="2", help="worker_processes (empty: as this machine's nginx.conf)")
    p.add_argument("--max-run-seconds", type=float, default=120.0, help="bound of every load run")
    p.add_argument("--litellm-routing", default="least-busy")
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--note", default="", help="a sentence printed at the top of the report")
    p.add_argument("--command", default=None, help="command line recorded in the report")
    a = p.parse_args(argv)
    if a.short:
        a.instances, a.token_seconds, a.requests, a.multipliers = 2, 0.002, 24, "1,3"
        a.ttft_requests, a.skip_litellm = 24, True
        a.chat_conversations, a.chat_turns, a.chat_doc_bytes, a.chat_answer_tokens = 8, 3, 2000, 8
        a.chat_think_s = 0.05
        a.fleet_sessions, a.fleet_agents, a.fleet_turns, a.fleet_prefix_bytes = 8, 2, 3, 8000
        a.fleet_task_bytes, a.fleet_tool_bytes, a.fleet_answer_tokens, a.fleet_think_s = 500, 1000, 8, 0.05
        a.fleet_ramp_s, a.fleet_multiuser = 0.5, False
        a.noisy_seconds, a.noisy_clients, a.quiet_requests = 4.0, 8, 10
    a.multipliers = [int(x) for x in str(a.multipliers).split(",") if x]
    a.configs = [x for x in str(a.configs).split(",") if x]
    unknown = set(a.configs) - set(CONFIGS) - {"baseline"}
    if unknown:
        p.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    if "baseline" in a.configs and not a.baseline_ref:
        p.error("configuration baseline needs --baseline-ref")
    a.nginx_workers = a.nginx_workers or None
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if not EMULATOR.exists():
        print(f"gateway_bench: {EMULATOR} is missing", file=sys.stderr)
        return 2
    if not shutil.which("nginx"):
        print("gateway_bench: nginx is not installed (make bootstrap / benchmarks/run.sh install it)", file=sys.stderr)
        return 2
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="herd-bench-")
    Path(args.work, "tmp").mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = args.command or "python3 " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    # SIGTERM (a test's timeout, Ctrl-C's cousin) still stops every process this run started (finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(args)
    facts = machine_facts()  # the commit and the state of the tree the run starts from
    t0 = time.monotonic()
    try:
        log(f"work dir {args.work}; starting {args.instances} emulators")
        bench.start_emulators()
        extra = bench.run_all()
    finally:
        bench.procs.stop_all()
    took = time.monotonic() - t0
    md, data = build_report(bench, extra, facts, command, started, took)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{started[:10]}-lab"
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    if not write_plot(bench, data, stem.with_suffix(".png")):
        log("matplotlib not importable: no plot")
    log(f"report: {stem}.md ({took:.0f} s)")
    if own_work:
        shutil.rmtree(args.work, ignore_errors=True)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
