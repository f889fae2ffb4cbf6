#!/usr/bin/env python3
"""herd gateway benchmark on loopback: emulated GPUs, one run, ratios.

Starts N Ollama emulator processes (lab/standins/ollama_emulator.py, fixed
token rate per slot) on 127.0.0.1, nginx with herd's gateway config rendered
from roles/gateway's template and defaults (and with the seed configs to
compare), optionally LiteLLM's proxy, and drives them with tools/herd_load.py.
Writes docs/benchmarks/<date>-lab.{md,json,png}.

Run it through benchmarks/run.sh, which prepares the Python environment
(jinja2, PyYAML, matplotlib, litellm) this script needs; the load tool itself
runs with the system python3 and the standard library only.

Sections:
  1. scaling      1 instance vs N through the gateway: throughput ratio / N
  2. policies     least_conn + max_conns (herd) vs round-robin vs random under mixed lengths
  3. streaming    TTFT through the gateway vs direct, and vs proxy_buffering on
  4. peer router  the same N instances behind LiteLLM's proxy vs herd's gateway
Every target is 127.0.0.1; every run is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = ROOT / "lab" / "standins" / "ollama_emulator.py"
MKMODELS = ROOT / "lab" / "standins" / "mkmodels.py"
LOAD_TOOL = ROOT / "tools" / "herd_load.py"
GATEWAY_ROLE = ROOT / "roles" / "gateway"
GATEWAY_TEMPLATE = GATEWAY_ROLE / "templates" / "etc" / "nginx" / "conf.d" / "herd-gateway.conf.j2"
GATEWAY_FILTERS = GATEWAY_ROLE / "filter_plugins" / "gateway.py"
GPU_SPEC = ROOT / "lab" / "gpus" / "rtx4090x8.json"

MODEL = "herd-tiny:1b"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
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


# ---------------------------------------------------------------- gateway config


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _comment(text: str) -> str:
    """Ansible's `comment` filter with its defaults."""
    return "#\n" + "\n".join("# " + line if line else "#" for line in text.splitlines()) + "\n#"


def render_herd_conf(ports: list[int], listen: int, num_parallel: int, access_log: Path) -> tuple[str, str]:
    """herd's gateway config for `ports`, from the role's template, defaults and filters.

    Returns (config, origin) where origin says what it was rendered from.
    """
    import jinja2
    import yaml

    defaults = yaml.safe_load((GATEWAY_ROLE / "defaults" / "main.yml").read_text())
    internals = yaml.safe_load((GATEWAY_ROLE / "vars" / "main.yml").read_text())
    filters = _load_module(GATEWAY_FILTERS, "herd_gateway_filters")
    plan = [
        {"id": i, "name": f"ollama-{i}", "port": p, "bind_address": HOST, "num_parallel": num_parallel,
         "models": [MODEL]}
        for i, p in enumerate(ports)
    ]
    servers = filters.gateway_servers(
        ["bench"], {"bench": {"_ollama_plan": plan}}, "bench",
        queue_per_instance=defaults["gateway_queue_per_instance"], max_fails=defaults["gateway_max_fails"],
        fail_timeout=defaults["gateway_fail_timeout"], weights=defaults["gateway_weights"],
        backups=defaults["gateway_backups"], weight_by_parallel=defaults["gateway_weight_by_parallel"],
    )
    # nothing drained (gateway_drain is empty by default): every server is up
    servers = filters.gateway_mark_down(servers, defaults["gateway_drain"])
    variables = dict(defaults)
    variables.update(internals)
    variables.update({
        "ansible_managed": "Managed by herd (Ansible); rendered by benchmarks/gateway_bench.py",
        "gateway_http_port": listen,
        "gateway_access_log": str(access_log),
        "gateway_allow": ["127.0.0.1/32"],
        "_gateway_servers": servers,
        "_gateway_keys": [],
    })
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["comment"] = _comment
    conf = env.from_string(GATEWAY_TEMPLATE.read_text()).render(**variables)
    rev = cmd_out(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", str(GATEWAY_ROLE)]) or "uncommitted"
    dirty = cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "--", str(GATEWAY_ROLE)])
    origin = f"roles/gateway template + defaults at {rev}{' (with uncommitted changes)' if dirty else ''}"
    return conf, origin


def variant(conf: str, name: str) -> str:
    """Seed configurations derived from herd's: same file, one policy or buffering change."""
    if name == "herd":
        return conf
    if name in ("round-robin", "random"):
        # Seed 001: no least_conn and no max_conns (nginx's default round-robin, or `random`).
        out = re.sub(r"^\s*least_conn;\n", "" if name == "round-robin" else "    random;\n", conf, flags=re.M)
        out = re.sub(r" max_conns=\d+", "", out)
        assert out != conf, "gateway template changed: cannot derive the seed config"
        return out
    if name == "buffered":
        # Seed 000: proxy_buffering on (nginx's default).
        out = conf.replace("proxy_buffering off;", "proxy_buffering on;")
        assert out != conf, "gateway template changed: cannot derive the buffered config"
        return out
    raise ValueError(name)


NGINX_MAIN = """\
# nginx main config of the benchmark (prefix {prefix}); includes one rendered gateway config.
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {conf};
}}
"""


class Gateway:
    def __init__(self, procs: Procs, work: Path, workers: int):
        self.procs = procs
        self.work = work
        self.workers = workers
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"

    def start(self, name: str, conf: str) -> None:
        prefix = self.work / f"nginx-{name}"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        (prefix / "gateway.conf").write_text(conf)
        (prefix / "nginx.conf").write_text(
            NGINX_MAIN.format(prefix=prefix, workers=self.workers, conf=prefix / "gateway.conf"))
        test = subprocess.run(["nginx", "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                              capture_output=True, text=True, check=False)
        if test.returncode != 0:
            raise RuntimeError(f"nginx -t failed for {name}:\n{test.stderr}")
        self.procs.start("nginx", ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                         log_path=prefix / "stdout.log")
        wait_http(self.url + "/herd/health", 15)

    def stop(self) -> None:
        self.procs.stop("nginx", sig=signal.SIGQUIT)


# ---------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.procs = Procs()
        self.ports: list[int] = []
        self.runs: dict[str, dict] = {}
        self.cpu: dict[str, dict] = {}

    # -- setup

    def start_emulators(self) -> None:
        a = self.args
        models = self.work / "models"
        subprocess.run([sys.executable, str(MKMODELS), str(models), "--model", MODEL], check=True,
                       stdout=subprocess.DEVNULL)
        for i in range(a.instances):
            port = free_port()
            env = dict(os.environ)
            env.update({
                "OLLAMA_HOST": f"{HOST}:{port}",
                "OLLAMA_MODELS": str(models),
                "OLLAMA_NUM_PARALLEL": str(a.num_parallel),
                "OLLAMA_MAX_QUEUE": "512",
                "OLLAMA_KEEP_ALIVE": "-1",
                "CUDA_VISIBLE_DEVICES": str(i),
                "HERD_LAB_GPU_SPEC": str(GPU_SPEC),
                "HERD_EMU_TOKENS_PER_SECOND": str(a.tokens_per_second),
                "HERD_EMU_RESPONSE_TOKENS": str(a.answer_tokens),
                "TMPDIR": str(self.work / "tmp"),
            })
            env.update(dict(kv.split("=", 1) for kv in a.emulator_env))
            self.procs.start(f"emu{i}", [sys.executable, str(EMULATOR), "serve"], env=env,
                             log_path=self.work / f"emu{i}.log")
            self.ports.append(port)
        for port in self.ports:
            wait_http(f"http://{HOST}:{port}/api/version", 30)
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
             stream: bool = True, record: bool = True, duration: float | None = None) -> dict:
        out = self.work / "runs" / f"{name}.json"
        out.parent.mkdir(exist_ok=True)
        argv = ["python3", str(LOAD_TOOL), "--url", url, "--api", api, "--model", MODEL,
                "--concurrency", str(concurrency), "--requests", str(requests),
                "--duration", str(duration or self.args.max_run_seconds), "--prompt-mix", mix,
                "--timeout", "120", "--json", str(out), "--quiet" if not record else "--progress=2"]
        if not stream:
            argv.append("--no-stream")
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
            ncpu = os.cpu_count() or 1
            cpu = {
                "elapsed_s": elapsed,
                "machine_busy": (busy1 - busy0) / max(total1 - total0, 1),
                "emulators_cpu_s": self.procs.cpu("emu") - emu0,
                "nginx_cpu_s": self.procs.cpu("nginx") - ngx0,
                "litellm_cpu_s": self.procs.cpu("litellm") - llm0,
                "load_tool_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                "cores": ncpu,
                # requests each instance logged during the run (from the emulators' access logs)
                "served_by_instance": [b - a for a, b in zip(served0, self.served(), strict=True)],
            }
            self.cpu[name] = cpu
            s = data["summary"]
            log(f"  -> ok {s['ok']}/{s['requests']} {s['req_per_s']:.2f} req/s {s['output_tokens_per_s']:.1f} tok/s "
                f"p99 {fmt(s['latency_s']['p99'])} s, machine busy {100 * cpu['machine_busy']:.0f}%")
            data.pop("samples_path", None)
            self.runs[name] = data
        return data

    # -- sections

    def run_all(self) -> dict:
        a = self.args
        n, p = a.instances, a.num_parallel
        gw = Gateway(self.procs, self.work, a.nginx_workers)
        herd_all, origin = render_herd_conf(self.ports, gw.port, p, self.work / "access.log")
        herd_one, _ = render_herd_conf(self.ports[:1], gw.port, p, self.work / "access.log")
        short = f"short:{a.prompt_words}:{a.answer_tokens}"
        rounds = a.rounds

        # 1. scaling
        gw.start("herd-1", herd_one)
        self.load("scale-1", gw.url, "generate", p, p * rounds, short)
        gw.stop()
        gw.start("herd-n", herd_all)
        self.load("scale-n", gw.url, "generate", n * p, n * p * rounds, short)

        # 2. policies under mixed lengths
        mixed = f"short:{a.prompt_words}:{a.mixed_short}:{a.mixed_weight},long:{a.prompt_words}:{a.mixed_long}:1"
        mixed_requests = n * p * a.mixed_rounds
        self.load("policy-herd", gw.url, "generate", n * p, mixed_requests, mixed)
        gw.stop()
        for pol in ("round-robin", "random"):
            gw.start(pol, variant(herd_all, pol))
            self.load(f"policy-{pol}", gw.url, "generate", n * p, mixed_requests, mixed)
            gw.stop()

        # 3. streaming: one instance, its slots full
        direct = f"http://{HOST}:{self.ports[0]}"
        c = a.ttft_concurrency
        self.load("ttft-direct", direct, "generate", c, a.ttft_requests, short)
        gw.start("herd-1", herd_one)
        self.load("ttft-gateway", gw.url, "generate", c, a.ttft_requests, short)
        gw.stop()
        gw.start("buffered", variant(herd_one, "buffered"))
        self.load("ttft-buffered", gw.url, "generate", c, a.ttft_requests, short)
        gw.stop()

        # 4. peer router
        litellm = self.section_litellm(gw, herd_all, short)
        return {"gateway_origin": origin, "litellm": litellm}

    def section_litellm(self, gw: Gateway, herd_all: str, short: str) -> dict:
        a = self.args
        n, p = a.instances, a.num_parallel
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
            wait_http(url + "/health/liveliness", 90)
        except RuntimeError as exc:
            tail = (self.work / "litellm.log").read_text(errors="replace")[-1500:]
            self.procs.stop("litellm")
            return {"status": "failed", "reason": f"{exc}\n{tail}"}
        self.load("warm-litellm", url, "openai", 1, 2, "w:8:2", record=False)
        # low load: added latency over a direct call; high load: throughput
        low = f"short:{a.prompt_words}:{a.low_load_tokens}"
        self.load("peer-direct-c1", f"http://{HOST}:{self.ports[0]}", "openai", 1, a.low_load_requests, low)
        self.load("peer-litellm-c1", url, "openai", 1, a.low_load_requests, low)
        self.load("peer-litellm-sat", url, "openai", n * p, n * p * a.rounds, short)
        self.procs.stop("litellm")
        gw.start("herd-n", herd_all)
        self.load("peer-herd-c1", gw.url, "openai", 1, a.low_load_requests, low)
        self.load("peer-herd-sat", gw.url, "openai", n * p, n * p * a.rounds, short)
        gw.stop()
        version = cmd_out([sys.executable, "-c", "import importlib.metadata as m; print(m.version('litellm'))"])
        return {"status": "ran", "version": version, "routing_strategy": a.litellm_routing,
                "config": cfg.read_text()}


# ---------------------------------------------------------------- report


def token_cv(run: dict) -> float | None:
    """Coefficient of variation of the output tokens each instance produced (0 = perfectly even work)."""
    vals = [u["output_tokens"] for u in run["by_upstream"].values()]
    if len(vals) < 2 or not sum(vals):
        return None
    mean = sum(vals) / len(vals)
    return (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5 / mean


def summary(run: dict) -> dict:
    return run["summary"]


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
    }


def build_report(bench: Bench, extra: dict, facts: dict, command: str, started: str, took: float) -> tuple[str, dict]:
    a = bench.args
    r = {k: summary(v) for k, v in bench.runs.items()}
    n, p = a.instances, a.num_parallel
    out: dict = {"sections": {}}

    def lat(name, key="latency_s", q="p99"):
        return r[name][key][q] if name in r else None

    # 1. scaling
    t1, tn = r["scale-1"]["output_tokens_per_s"], r["scale-n"]["output_tokens_per_s"]
    q1, qn = r["scale-1"]["req_per_s"], r["scale-n"]["req_per_s"]
    scaling = {"tok_per_s_1": t1, "tok_per_s_n": tn, "req_per_s_1": q1, "req_per_s_n": qn,
               "efficiency_tokens": ratio(tn, n * t1), "efficiency_requests": ratio(qn, n * q1),
               "spread_n": bench.runs["scale-n"]["spread"]}
    out["sections"]["scaling"] = scaling

    # 2. policies
    pol = {}
    for name in ("herd", "round-robin", "random"):
        s = r[f"policy-{name}"]
        pol[name] = {"req_per_s": s["req_per_s"], "tok_per_s": s["output_tokens_per_s"],
                     "p50": s["latency_s"]["p50"], "p99": s["latency_s"]["p99"],
                     "short_p99": bench.runs[f"policy-{name}"]["by_class"].get("short", {}).get("latency_s", {}).get("p99"),
                     "errors": s["errors_by_status"], "spread_cv": bench.runs[f"policy-{name}"]["spread"]["cv"],
                     "token_cv": token_cv(bench.runs[f"policy-{name}"])}
    out["sections"]["policies"] = pol

    # 3. streaming
    st = {k: {"ttft_p50": lat(f"ttft-{k}", "ttft_s", "p50"), "ttft_p99": lat(f"ttft-{k}", "ttft_s", "p99"),
              "latency_p50": lat(f"ttft-{k}", "latency_s", "p50")} for k in ("direct", "gateway", "buffered")}
    out["sections"]["streaming"] = st

    # 4. peer router
    peer = dict(extra["litellm"])
    if peer.get("status") == "ran":
        for k in ("direct-c1", "litellm-c1", "herd-c1", "litellm-sat", "herd-sat"):
            s = r[f"peer-{k}"]
            peer[k] = {"ttft_p50": s["ttft_s"]["p50"], "latency_p50": s["latency_s"]["p50"],
                       "latency_p99": s["latency_s"]["p99"], "req_per_s": s["req_per_s"],
                       "tok_per_s": s["output_tokens_per_s"], "errors": s["errors_by_status"]}
    out["sections"]["peer_router"] = peer
    out.update({"facts": facts, "command": command, "started": started, "took_s": took,
                "settings": vars(a), "cpu": bench.cpu, "gateway_origin": extra["gateway_origin"],
                "runs": {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in bench.runs.items()}})

    # ---- markdown
    L = []
    L.append(f"# herd gateway benchmark, lab, {started[:10]}")
    L.append("")
    L.append("**Backends are emulated.** Every instance is herd's Ollama emulator "
             "(`lab/standins/ollama_emulator.py`), not a GPU: it streams tokens at a fixed rate per slot "
             f"({a.tokens_per_second:g} tokens/s, {p} slots per instance). The numbers measure herd's gateway "
             "(nginx config and balancing policy) and the load tool, not model speed. "
             "All figures come from this one run; ratios matter, absolute values do not carry to real GPUs.")
    L.append("")
    L.append("Reproduce (from the repository root, as root, on Debian/Ubuntu):")
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
             f"{facts['python_bench']}, emulator `{facts['emulator'][0]}`, LiteLLM {peer.get('version', '-')}, "
             f"herd {facts['herd_commit']} |")
    L.append(f"| gateway config | rendered from {extra['gateway_origin']}; nginx `worker_processes {a.nginx_workers}` |")
    L.append(f"| instances | {n} emulator processes on 127.0.0.1, model `{MODEL}`, OLLAMA_NUM_PARALLEL={p}, "
             f"{a.tokens_per_second:g} tok/s per slot |")
    L.append(f"| load | tools/herd_load.py, closed loop, streaming `/api/generate` unless noted; prompts "
             f"{a.prompt_words} words; answers {a.answer_tokens} tokens |")
    L.append(f"| wall time | {took:.0f} s for the whole run |")
    L.append("")

    L.append("## 1. Scaling: 1 instance vs N through the gateway")
    L.append("")
    L.append(f"Concurrency = instances x {p} slots, {a.rounds} rounds.")
    L.append("")
    L.append("| instances | req/s | output tok/s | latency p50 / p99 (s) |")
    L.append("|---|---|---|---|")
    for k, cnt in (("scale-1", 1), ("scale-n", n)):
        s = r[k]
        L.append(f"| {cnt} | {s['req_per_s']:.2f} | {s['output_tokens_per_s']:.1f} | "
                 f"{fmt(s['latency_s']['p50'])} / {fmt(s['latency_s']['p99'])} |")
    eff = scaling["efficiency_tokens"]
    L.append("")
    L.append(f"**Scaling efficiency at N={n}: throughput ratio / N = {fmt(eff)} (tokens), "
             f"{fmt(scaling['efficiency_requests'])} (requests); goal >= 0.95: "
             f"{'met' if eff is not None and eff >= 0.95 else 'NOT met'}.** "
             f"Per-instance spread at N={n}: max/min requests {fmt(scaling['spread_n']['max_over_min'], 2)}, "
             f"CV {fmt(scaling['spread_n']['cv'])}.")
    L.append("")

    L.append("## 2. Balancing policies under mixed request lengths")
    L.append("")
    L.append(f"{n} instances, concurrency {n * p}, {n * p * a.mixed_rounds} requests; mix: {a.mixed_weight}:1 short "
             f"({a.mixed_short} tokens) to long ({a.mixed_long} tokens). herd = least_conn + shared zone + "
             "max_conns = num_parallel + queue; the seed configs (001) drop least_conn and max_conns.")
    L.append("")
    L.append("| policy | req/s | tok/s | latency p50 | latency p99 | short-request p99 | p99 vs herd | "
             "throughput vs herd | requests CV | tokens CV | errors |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    h = pol["herd"]
    for name, v in pol.items():
        label = "herd (least_conn + max_conns)" if name == "herd" else name
        errs = ", ".join(f"{k}: {c}" for k, c in v["errors"].items()) or "none"
        L.append(f"| {label} | {v['req_per_s']:.2f} | {v['tok_per_s']:.1f} | {fmt(v['p50'])} | {fmt(v['p99'])} | "
                 f"{fmt(v['short_p99'])} | {fmt(ratio(v['p99'], h['p99']), 2)} | "
                 f"{fmt(ratio(v['tok_per_s'], h['tok_per_s']), 3)} | {fmt(v['spread_cv'])} | {fmt(v['token_cv'])} | "
                 f"{errs} |")
    L.append("")
    L.append("CV = coefficient of variation over the instances of the requests served and of the output tokens "
             "generated (the work). Round-robin evens out request counts, least_conn evens out the work in "
             "flight.")
    L.append("")

    L.append("## 3. Streaming: time to first token")
    L.append("")
    L.append(f"One instance, {a.ttft_concurrency} clients, {a.ttft_requests} requests of {a.answer_tokens} tokens each "
             "(the first token includes the emulated prompt evaluation).")
    L.append("")
    L.append("| path | TTFT p50 | TTFT p99 | latency p50 | TTFT p50 vs direct |")
    L.append("|---|---|---|---|---|")
    labels = {"direct": "direct to the instance", "gateway": "herd gateway (proxy_buffering off)",
              "buffered": "seed 000 config (proxy_buffering on)"}
    for k, v in st.items():
        L.append(f"| {labels[k]} | {fmt(v['ttft_p50'])} s | {fmt(v['ttft_p99'])} s | {fmt(v['latency_p50'])} s | "
                 f"{fmt(ratio(v['ttft_p50'], st['direct']['ttft_p50']), 2)} |")
    add = None
    if st["gateway"]["ttft_p50"] is not None and st["direct"]["ttft_p50"] is not None:
        add = 1000 * (st["gateway"]["ttft_p50"] - st["direct"]["ttft_p50"])
    L.append("")
    held = None
    if st["buffered"]["ttft_p50"] is not None and st["buffered"]["latency_p50"]:
        held = st["buffered"]["ttft_p50"] / st["buffered"]["latency_p50"]
    L.append(f"The gateway adds {fmt(add, 2)} ms to TTFT p50.")
    if held is not None and held > 0.5:
        L.append(f"With `proxy_buffering on` the first token arrives at {100 * held:.0f}% of the whole answer's time: "
                 "the stream is held back.")
    elif held is not None:
        L.append(f"With `proxy_buffering on` the first token still arrives at {100 * held:.0f}% of the answer's time: "
                 f"nginx {facts['nginx']} passed each chunk on as it arrived from the instance, so in this run "
                 "buffering cost no TTFT. herd keeps it off anyway: with buffering on nginx reads the whole answer "
                 "into its buffers (and temp files) regardless of the client, and any buffer-filling layer (gzip, "
                 "a slow client) would hold tokens back.")
    L.append("")

    L.append("## 4. Peer router: LiteLLM proxy vs herd's gateway")
    L.append("")
    if peer.get("status") != "ran":
        L.append(f"Skipped: {peer.get('status')}: {peer.get('reason')}")
    else:
        L.append(f"Same {n} instances behind LiteLLM {peer['version']} (`litellm --config`, routing "
                 f"`{peer['routing_strategy']}`, OpenAI provider to each instance's `/v1`, 1 worker) and behind herd's "
                 "gateway; streaming `/v1/chat/completions`. Low load: 1 client. Saturation: concurrency "
                 f"{n * p}.")
        L.append("")
        L.append("| path | TTFT p50 (1 client) | latency p50 (1 client) | req/s saturated | tok/s saturated | "
                 "latency p99 saturated | errors saturated |")
        L.append("|---|---|---|---|---|---|---|")
        d = peer["direct-c1"]
        L.append(f"| direct to one instance | {fmt(d['ttft_p50'])} | {fmt(d['latency_p50'])} | - | - | - | - |")
        for k, label in (("herd", "herd gateway"), ("litellm", "LiteLLM proxy")):
            lo, hi = peer[f"{k}-c1"], peer[f"{k}-sat"]
            errs = ", ".join(f"{e}: {c}" for e, c in hi["errors"].items()) or "none"
            L.append(f"| {label} | {fmt(lo['ttft_p50'])} | {fmt(lo['latency_p50'])} | {hi['req_per_s']:.2f} | "
                     f"{hi['tok_per_s']:.1f} | {fmt(hi['latency_p99'])} | {errs} |")
        added_l = 1000 * (peer["litellm-c1"]["ttft_p50"] - d["ttft_p50"]) if peer["litellm-c1"]["ttft_p50"] else None
        added_h = 1000 * (peer["herd-c1"]["ttft_p50"] - d["ttft_p50"]) if peer["herd-c1"]["ttft_p50"] else None
        L.append("")
        L.append(f"Added TTFT p50 over a direct call: herd {fmt(added_h, 2)} ms, LiteLLM {fmt(added_l, 2)} ms "
                 "(differences under about 1 ms are within this run's noise). "
                 f"Saturated throughput LiteLLM / herd = "
                 f"{fmt(ratio(peer['litellm-sat']['tok_per_s'], peer['herd-sat']['tok_per_s']), 3)} (tokens).")
        lc, hc = bench.cpu.get("peer-litellm-sat", {}), bench.cpu.get("peer-herd-sat", {})
        if lc and hc:
            L.append(f"Requests per instance while saturated (backend logs): LiteLLM "
                     f"{' / '.join(map(str, lc['served_by_instance']))}, herd "
                     f"{' / '.join(map(str, hc['served_by_instance']))}. LiteLLM's proxy used "
                     f"{lc['litellm_cpu_s']:.1f} CPU s in {lc['elapsed_s']:.0f} s "
                     f"({100 * lc['litellm_cpu_s'] / lc['elapsed_s']:.0f}% of one core), nginx "
                     f"{hc['nginx_cpu_s']:.2f} CPU s in {hc['elapsed_s']:.0f} s. An uneven spread queues requests at the "
                     "busiest instances while others have free slots; and on this shared 2-core machine a Python "
                     "proxy feels CPU contention more than nginx does. Read the ratio as LiteLLM's cost in this "
                     "setup, not as its speed on a dedicated host.")
    L.append("")

    L.append("## CPU use (is the machine the bottleneck?)")
    L.append("")
    ours_max = max((c["emulators_cpu_s"] + c["nginx_cpu_s"] + c["load_tool_cpu_s"] + c["litellm_cpu_s"])
                   / max(c["elapsed_s"] * c["cores"], 1e-9) for c in bench.cpu.values())
    busy_mean = sum(c["machine_busy"] for c in bench.cpu.values()) / max(len(bench.cpu), 1)
    sc = bench.cpu.get("scale-n", {})
    emu_rate = r["scale-n"]["output_tokens"] / sc["emulators_cpu_s"] if sc.get("emulators_cpu_s") else None
    L.append(f"CPU seconds of the benchmark's own processes per run ({facts['nproc']} CPUs). The machine is shared: "
             f"'machine busy' counts every user's work and averaged {100 * busy_mean:.0f}% during this run, while "
             f"the benchmark's processes used at most {100 * ours_max:.0f}% of the machine. The emulators cost "
             f"{fmt(emu_rate, 0)} output tokens per CPU second in the N={n} run, so its "
             f"{r['scale-n']['output_tokens_per_s']:.0f} tok/s took "
             f"{fmt(100 * r['scale-n']['output_tokens_per_s'] / emu_rate if emu_rate else None, 0)}% of one core: "
             "throughput followed the number of instances, not this machine's CPU (section 1). The last column "
             "counts the requests each emulator logged during the run, whoever routed them.")
    L.append("")
    L.append("| run | wall s | output tokens | emulators CPU s | nginx CPU s | load tool CPU s | LiteLLM CPU s | "
             "benchmark's share of the machine | machine busy (all users) | requests per instance (backend logs) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for k, c in bench.cpu.items():
        ours = c["emulators_cpu_s"] + c["nginx_cpu_s"] + c["load_tool_cpu_s"] + c["litellm_cpu_s"]
        share = ours / max(c["elapsed_s"] * c["cores"], 1e-9)
        L.append(f"| {k} | {c['elapsed_s']:.1f} | {r[k]['output_tokens']} | {c['emulators_cpu_s']:.2f} | "
                 f"{c['nginx_cpu_s']:.2f} | {c['load_tool_cpu_s']:.2f} | {c['litellm_cpu_s']:.2f} | "
                 f"{100 * share:.0f}% | {100 * c['machine_busy']:.0f}% | "
                 f"{' / '.join(str(x) for x in c['served_by_instance'])} |")
    L.append("")
    L.append(f"Raw results (every run's summary, per-instance spread and settings): `{started[:10]}-lab.json`; "
             f"plot: `{started[:10]}-lab.png`.")
    L.append("")
    return "\n".join(L), out


def write_plot(bench: Bench, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for name in ("policy-herd", "policy-round-robin", "policy-random"):
        run = bench.runs.get(name)
        if not run:
            continue
        vals = sorted(s["latency"] for s in run["samples"] if s["ok"])
        ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=name.replace("policy-", ""))
    ax.set_title("mixed lengths: latency CDF by policy")
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    for name in ("ttft-direct", "ttft-gateway", "ttft-buffered"):
        run = bench.runs.get(name)
        if not run:
            continue
        vals = sorted(s["ttft"] for s in run["samples"] if s["ok"] and s["ttft"] is not None)
        if vals:
            ax.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=name.replace("ttft-", ""))
    ax.set_title("time to first token, one instance (CDF)")
    ax.set_xlabel("seconds")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[2]
    width = 0.27
    for j, name in enumerate(("policy-herd", "policy-round-robin", "policy-random")):
        run = bench.runs.get(name)
        if not run:
            continue
        ups = sorted(run["by_upstream"])
        ax.bar([i + (j - 1) * width for i in range(len(ups))], [run["by_upstream"][u]["output_tokens"] for u in ups],
               width, label=name.replace("policy-", ""))
    ax.set_title("per-instance output tokens (mixed lengths)")
    ax.set_xlabel("instance")
    ax.set_xticks(range(len(bench.ports)))
    ax.legend()
    fig.suptitle("herd gateway benchmark, lab, emulated backends")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), help="report folder")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp dir)")
    p.add_argument("--instances", type=int, default=8)
    p.add_argument("--num-parallel", type=int, default=4, help="OLLAMA_NUM_PARALLEL of each instance")
    p.add_argument("--tokens-per-second", type=float, default=20.0, help="emulated tokens/s per slot")
    p.add_argument("--answer-tokens", type=int, default=32, help="answer length of the uniform runs")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="requests per client in the saturating runs")
    p.add_argument("--mixed-short", type=int, default=16)
    p.add_argument("--mixed-long", type=int, default=128)
    p.add_argument("--mixed-weight", type=int, default=4, help="short requests per long one")
    p.add_argument("--mixed-rounds", type=int, default=8)
    p.add_argument("--ttft-requests", type=int, default=40, help="requests of each streaming (TTFT) run")
    p.add_argument("--ttft-concurrency", type=int, default=4, help="clients of each streaming (TTFT) run")
    p.add_argument("--low-load-requests", type=int, default=20, help="requests of the 1-client peer-router runs")
    p.add_argument("--low-load-tokens", type=int, default=16, help="answer length of the 1-client peer-router runs")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--max-run-seconds", type=float, default=120.0, help="bound of every load run")
    p.add_argument("--litellm-routing", default="least-busy")
    p.add_argument("--skip-litellm", action="store_true")
    p.add_argument("--emulator-env", action="append", default=[], metavar="K=V", help="extra emulator environment")
    p.add_argument("--command", default=None, help="command line recorded in the report")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not EMULATOR.exists():
        print(f"gateway_bench: {EMULATOR} is missing", file=sys.stderr)
        return 2
    if not shutil.which("nginx"):
        print("gateway_bench: nginx is not installed (benchmarks/run.sh installs nginx-light)", file=sys.stderr)
        return 2
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="herd-bench-")
    Path(args.work, "tmp").mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = args.command or "python3 " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    bench = Bench(args)
    t0 = time.monotonic()
    try:
        log(f"work dir {args.work}; starting {args.instances} emulators")
        bench.start_emulators()
        extra = bench.run_all()
    finally:
        bench.procs.stop_all()
    took = time.monotonic() - t0
    facts = machine_facts()
    md, data = build_report(bench, extra, facts, command, started, took)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{started[:10]}-lab"
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    if not write_plot(bench, stem.with_suffix(".png")):
        log("matplotlib not importable: no plot")
    log(f"report: {stem}.md ({took:.0f} s)")
    if own_work:
        shutil.rmtree(args.work, ignore_errors=True)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
