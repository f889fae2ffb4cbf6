#!/usr/bin/env python3
"""herd's scale benchmark (issue 32): herd's gateway, rendered by role gateway's own tasks, in front of 8, 64 and
512 emulated instances on loopback, the same load at every size, in one run.

The instances are herd's Ollama emulator (lab/standins/ollama_emulator.py): a few processes, each serving up to
--per-process instances on their own ports (HERD_EMU_EXTRA_PORTS: every instance its own scheduler, slots and
loaded model). Per size it reports: the gateway's TTFT (p50, p99) under the same closed-loop load and its overhead
over a direct call, nginx CPU per request, `/api/tags` cold and cached and how many fan-outs to the instances a
burst of catalogue requests caused, `/herd/pools` latency and size, the time of a reload (SIGHUP until the new
workers serve) and nginx's memory (PSS), herd-exporter's collect() of the gateway (its /herd/pools), and one
round of herd-guard's gateway duty (a probe of every instance), each with the role's defaults.

Usage: python3 benchmarks/scale_bench.py [--short] [--sizes 8,64,512] [--out DIR]
Every target is 127.0.0.1; every run is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# herd's service library, importable as herd-exporter and herd-guard import it on the hosts (role herd_service).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "roles" / "herd_service" / "files"))
import gateway_bench as gb  # noqa: E402
import herd_render  # noqa: E402
import yaml  # noqa: E402

ROOT = gb.ROOT
MODEL = gb.MODEL
HOST = gb.HOST
herd_load = gb.herd_load
log = gb.log
fmt = gb.fmt


def pss_kib(pid: int) -> int:
    """Proportional set size of a process (shared pages split between their users), KiB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def timed_get(url: str, timeout: float = 30.0) -> tuple[float, int, int]:
    """(seconds, status, bytes) of one GET."""
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body = resp.read()
        return time.monotonic() - t0, resp.status, len(body)


class Fleet:
    """The emulator processes serving `size` instances; their logs count the requests each path got."""

    def __init__(self, procs: gb.Procs, work: Path, args):
        self.procs, self.work, self.args = procs, work, args
        self.ports: list[int] = []
        self.logs: list[Path] = []

    def start(self, size: int) -> None:
        a = self.args
        models = self.work / "models"
        if not models.exists():
            subprocess.run([sys.executable, str(gb.MKMODELS), str(models), "--model", MODEL], check=True,
                           stdout=subprocess.DEVNULL)
        seen: set[int] = set()
        while len(seen) < size:
            seen.add(gb.free_port())
        self.ports = sorted(seen)
        per = a.per_process
        for n in range(math.ceil(size / per)):
            group = self.ports[n * per:(n + 1) * per]
            env = dict(os.environ)
            env.update({
                "OLLAMA_HOST": f"{HOST}:{group[0]}", "OLLAMA_MODELS": str(models),
                "OLLAMA_NUM_PARALLEL": str(a.num_parallel), "OLLAMA_KEEP_ALIVE": "-1",
                "CUDA_VISIBLE_DEVICES": "0", "HERD_LAB_GPU_SPEC": str(gb.GPU_SPEC),
                "HERD_EMU_TOKENS_PER_SECOND": str(1.0 / a.token_seconds),
                "HERD_EMU_PROMPT_TOKENS_PER_SECOND": "1000000",
                "HERD_EMU_LOAD_SECONDS": "0.01", "HERD_EMU_RESPONSE_TOKENS": str(a.tokens),
                "HERD_EMU_EXTRA_PORTS": ",".join(str(p) for p in group[1:]), "TMPDIR": str(self.work / "tmp"),
            })
            path = self.work / f"emu-{size}-{n}.log"
            self.logs.append(path)
            self.procs.start(f"emu{n}", [sys.executable, str(gb.EMULATOR), "serve"], env=env, log_path=path)
        for port in self.ports:
            gb.wait_http(f"http://{HOST}:{port}/api/version", 60)
        # Every instance loads the model before anything is measured (a cold load is no gateway cost).
        todo = list(self.ports)
        lock = threading.Lock()

        def warm():
            while True:
                with lock:
                    if not todo:
                        return
                    port = todo.pop()
                body = json.dumps({"model": MODEL, "prompt": "warm", "stream": False,
                                   "options": {"num_predict": 1}}).encode()
                req = urllib.request.Request(f"http://{HOST}:{port}/api/generate", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()

        threads = [threading.Thread(target=warm) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def count(self, path: str) -> int:
        """Requests for `path` the instances logged so far."""
        pattern = re.compile(r'(?:GET|POST|HEAD)\s+"' + re.escape(path) + '"')
        return sum(len(pattern.findall(p.read_text(errors="replace"))) for p in self.logs if p.exists())

    def stop(self) -> None:
        for name in [n for n in self.procs.items if n.startswith("emu")]:
            self.procs.stop(name)
        self.logs = []


class Scale:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.procs = gb.Procs()
        self.fleet = Fleet(self.procs, self.work, args)
        self.port = gb.free_port()
        self.url = f"http://{HOST}:{self.port}"

    def nginx_pids(self) -> list[int]:
        p = self.procs.items.get("nginx")
        return [p.pid, *gb.children_of(p.pid)] if p and p.poll() is None else []

    def nginx_cpu(self) -> float:
        return sum(gb.proc_cpu_s(pid) for pid in self.nginx_pids())

    def load(self, name: str, url: str, concurrency: int, requests: int) -> dict:
        out = self.work / f"{name}.json"
        argv = ["python3", str(gb.LOAD_TOOL), "--url", url, "--api", "generate", "--model", MODEL,
                "--concurrency", str(concurrency), "--requests", str(requests), "--seed", "1",
                "--duration", str(self.args.max_run_seconds), "--prompt-mix", f"s:8:{self.args.tokens}",
                "--timeout", "60", "--json", str(out), "--quiet", "--no-samples"]
        res = subprocess.run(argv, stdout=subprocess.DEVNULL, check=False)
        if res.returncode not in (0, 1):
            raise RuntimeError(f"load run {name} failed with {res.returncode}")
        return json.loads(out.read_text())["summary"]

    def size_run(self, size: int) -> dict:
        a = self.args
        log(f"size {size}: starting {size} instances in {math.ceil(size / a.per_process)} emulator processes")
        t0 = time.monotonic()
        self.fleet.start(size)
        started = time.monotonic() - t0
        plan = gb.instance_plan(self.fleet.ports, a.num_parallel)
        log(f"size {size}: rendering herd's gateway with role gateway's tasks")
        pre = herd_render.render_gateway(self.work / f"nginx-{size}", plan, self.port, workers=a.nginx_workers)
        row: dict = {"instances": size, "slots": size * a.num_parallel, "emulators_start_s": started,
                     "render_s": pre.render_seconds}
        self.procs.start("nginx", pre.nginx_argv(), log_path=pre.path / "stdout.log")
        try:
            gb.wait_http(self.url + "/api/version", 30)
            row.update(self.measure(size, pre))
        finally:
            self.procs.stop("nginx", sig=signal.SIGQUIT)
            self.fleet.stop()
        log(f"size {size}: TTFT p50 {fmt(row['ttft_p50'])} s p99 {fmt(row['ttft_p99'])} s, "
            f"nginx {fmt(row['nginx_cpu_ms_per_request'], 2)} ms CPU/request, /api/tags cold "
            f"{fmt(1000 * row['tags_cold_s'], 1)} ms, reload {fmt(row['reload_s'], 2)} s, guard round "
            f"{fmt(row['guard_round_s'], 2)} s")
        return row

    def measure(self, size: int, pre: herd_render.Prefix) -> dict:
        a = self.args
        row: dict = {}
        # The same closed-loop load at every size, through the gateway, then straight to one instance.
        self.load(f"warm-{size}", self.url, a.concurrency, a.concurrency * 2)
        cpu0 = self.nginx_cpu()
        s = self.load(f"gateway-{size}", self.url, a.concurrency, a.requests)
        row["nginx_cpu_ms_per_request"] = 1000 * (self.nginx_cpu() - cpu0) / max(s["requests"], 1)
        row.update({"requests": s["requests"], "ok": s["ok"], "ttft_p50": s["ttft_s"]["p50"],
                    "ttft_p99": s["ttft_s"]["p99"], "tokens_per_s": s["output_tokens_per_s"]})
        d = self.load(f"direct-{size}", f"http://{HOST}:{self.fleet.ports[0]}", a.num_parallel,
                      max(a.requests // 4, a.num_parallel))
        row.update({"direct_ttft_p50": d["ttft_s"]["p50"], "direct_ttft_p99": d["ttft_s"]["p99"]})
        # The catalogue: one GET after its cache expired, then cached ones; then a burst over several cache
        # lifetimes, counting the /api/tags requests the instances got (a fan-out asks every instance once).
        time.sleep(a.catalogue_ttl + 0.5)
        row["tags_cold_s"] = timed_get(self.url + "/api/tags")[0]
        row["tags_cached_s"] = sorted(timed_get(self.url + "/api/tags")[0] for _ in range(20))[10]
        time.sleep(a.catalogue_ttl + 0.5)
        before = self.fleet.count("/api/tags")
        burst_s, gets, errors = self.catalogue_burst()
        time.sleep(0.5)
        asked = self.fleet.count("/api/tags") - before
        row.update({"tags_burst_requests": gets, "tags_burst_errors": errors, "tags_burst_s": burst_s,
                    "tags_fanouts": asked / size, "tags_intervals": burst_s / a.catalogue_ttl})
        pools = [timed_get(self.url + "/herd/pools") for _ in range(11)]
        row["pools_s"] = sorted(x[0] for x in pools)[5]
        row["pools_bytes"] = pools[0][2]
        row["exporter_collect_s"] = self.exporter_collect()
        row["guard_round_s"], row["guard_judged"] = self.guard_round(pre)
        row["reload_s"] = self.reload(pre)
        row["nginx_pss_mib"] = sum(pss_kib(pid) for pid in self.nginx_pids()) / 1024
        return row

    def catalogue_burst(self) -> tuple[float, int, int]:
        """4 clients asking /api/tags back to back for --burst-seconds; (seconds, requests, errors)."""
        stop = time.monotonic() + self.args.burst_seconds
        counts = [0, 0]
        lock = threading.Lock()

        def client():
            while time.monotonic() < stop:
                try:
                    ok = timed_get(self.url + "/api/tags")[1] == 200
                except OSError:
                    ok = False
                with lock:
                    counts[0] += 1
                    counts[1] += 0 if ok else 1

        t0 = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0, counts[0], counts[1]

    def exporter_collect(self) -> float:
        """Seconds of herd-exporter's collect() and render on the gateway host (reads /herd/pools), median of 5."""
        ex = gb._load_module(ROOT / "roles" / "exporter" / "files" / "herd_exporter.py", "herd_exporter_for_scale")
        exporter = ex.Exporter({"host": "bench", "instances": [], "gateway": {"pools_url": self.url + "/herd/pools"}})
        times = []
        for _ in range(5):
            t0 = time.monotonic()
            ex.render(exporter.collect())
            times.append(time.monotonic() - t0)
        return sorted(times)[2]

    def guard_round(self, pre: herd_render.Prefix) -> tuple[float, int]:
        """One round of herd-guard's gateway duty with the role's defaults: read /herd/pools, probe every instance
        (one thread each), judge; (seconds, instances judged). Nothing is drained: every instance answers."""
        g = gb._load_module(ROOT / "roles" / "guard" / "files" / "herd_guard.py", "herd_guard_for_scale")
        defaults = yaml.safe_load((ROOT / "roles" / "guard" / "defaults" / "main.yml").read_text())
        cfg = {"host": "bench", "listen_address": HOST, "port": gb.free_port(), "peers": [], "local": None,
               "gateway": {"pools_url": self.url + "/herd/pools", "drain_command": "/bin/false",
                           "state_file": str(pre.path / "guard-state.json")}}
        for key in ("interval", "probe_timeout", "canary_timeout", "failures", "restart_failures", "passes",
                    "warm_timeout", "restart_interval", "stall_seconds", "restart_max_per_hour", "http_timeout",
                    "http_workers", "http_max_connections"):
            cfg[key] = defaults[f"guard_{key}"]
        guard = g.Guard(g.check_config(cfg))
        t0 = time.monotonic()
        guard.gateway_round()
        took = time.monotonic() - t0
        judged = len(guard.targets)
        if guard.drained:
            raise RuntimeError(f"herd-guard drained {sorted(guard.drained)} in the scale run")
        return took, judged

    def reload(self, pre: herd_render.Prefix) -> float:
        """SIGHUP to nginx's master until every worker is a new one and the gateway answers (seconds)."""
        master = self.procs.items["nginx"].pid
        old = set(gb.children_of(master))
        t0 = time.monotonic()
        os.kill(master, signal.SIGHUP)
        deadline = t0 + 120
        while time.monotonic() < deadline:
            now = set(gb.children_of(master))
            if now and not now & old:
                try:
                    if timed_get(self.url + "/api/version", 5)[1] == 200:
                        return time.monotonic() - t0
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError("nginx did not reload within 120 s")


def goals(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """Issue 32's gateway goals, from the smallest and the largest size of this run."""
    small, large = rows[0], rows[-1]
    checks = []
    for key, bound in (("ttft_p50", 1.1), ("ttft_p99", 1.3)):
        r = gb.ratio(large[key], small[key])
        checks.append((f"gateway TTFT {key[5:]} at {large['instances']} instances at most {bound}x its value at "
                       f"{small['instances']}, same load", f"{fmt(large[key])} s vs {fmt(small[key])} s: {fmt(r, 2)}x",
                       None if r is None else r <= bound))
    per = large["tags_fanouts"] / max(large["tags_intervals"], 1e-9)
    checks.append(("catalogue requests cost at most one fan-out to the instances per cache interval",
                   f"{large['tags_burst_requests']} GET /api/tags over {fmt(large['tags_burst_s'], 1)} s "
                   f"({fmt(large['tags_intervals'], 1)} intervals): {fmt(large['tags_fanouts'], 2)} fan-outs, "
                   f"{fmt(per, 2)} per interval", per <= 1.0 + 1e-9 + 1.0 / max(large["tags_intervals"], 1)))
    checks.append((f"herd-guard's round at {large['instances']} instances within its interval "
                   f"({large['guard_interval']} s)", f"{fmt(large['guard_round_s'], 2)} s",
                   large["guard_round_s"] <= large["guard_interval"]))
    checks.append((f"herd-exporter's collect at {large['instances']} instances within its scrape timeout (2 s)",
                   f"{fmt(1000 * large['exporter_collect_s'], 1)} ms", large["exporter_collect_s"] <= 2.0))
    return checks


def report(rows: list[dict], args, facts: dict, command: str, started: str, took: float) -> str:
    L = [f"# herd scale benchmark, lab, {started[:10]}", "",
         "**Backends are emulated.** Every instance is herd's Ollama emulator (lab/standins/ollama_emulator.py), up "
         f"to {args.per_process} instances per process, each with its own port, {args.num_parallel} slots and its "
         f"model loaded; {1000 * args.token_seconds:g} ms per token. herd's gateway is rendered by role gateway's own "
         "tasks (benchmarks/herd_render.py) for all the instances on one host entry, with the role's defaults, and "
         f"runs on this machine's nginx ({args.nginx_workers} workers). All figures come from this one run on a "
         "shared machine.", "",
         f"Made with (from the repository root) at herd commit `{facts['herd_commit']}`"
         f"{' (with uncommitted changes)' if facts['herd_dirty'] else ''}:", "", "```sh", command, "```", "",
         f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory_gib']} GiB, {facts['os']}; nginx "
         f"{facts['nginx']}. Load at every size: tools/herd_load.py, closed loop, {args.concurrency} clients, "
         f"{args.requests} streamed `/api/generate` requests of {args.tokens} tokens (fewer clients than the "
         "smallest size's slots: nothing waits, so TTFT is the gateway's path). Direct: one instance, as many "
         f"clients as its slots. Wall time {took:.0f} s.", "",
         "| instances | served | TTFT p50 | TTFT p99 | direct p50 / p99 | nginx CPU per request | /api/tags cold / "
         "cached | catalogue fan-outs per interval | /herd/pools (size) | exporter collect | guard round (judged) | "
         "reload | nginx PSS | render |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = r["tags_fanouts"] / max(r["tags_intervals"], 1e-9)
        L.append(f"| {r['instances']} | {r['ok']}/{r['requests']} | {fmt(1000 * r['ttft_p50'], 1)} ms | "
                 f"{fmt(1000 * r['ttft_p99'], 1)} ms | {fmt(1000 * r['direct_ttft_p50'], 1)} / "
                 f"{fmt(1000 * r['direct_ttft_p99'], 1)} ms | {fmt(r['nginx_cpu_ms_per_request'], 2)} ms | "
                 f"{fmt(1000 * r['tags_cold_s'], 1)} / {fmt(1000 * r['tags_cached_s'], 2)} ms | {fmt(per, 2)} "
                 f"({r['tags_burst_requests']} requests) | {fmt(1000 * r['pools_s'], 1)} ms ({r['pools_bytes']} B) | "
                 f"{fmt(1000 * r['exporter_collect_s'], 1)} ms | {fmt(r['guard_round_s'], 2)} s ({r['guard_judged']}) | "
                 f"{fmt(r['reload_s'], 2)} s | {fmt(r['nginx_pss_mib'], 1)} MiB | {fmt(r['render_s'], 0)} s |")
    L.append("")
    base = rows[0]
    L.append("Ratios to the smallest size, this run: " + "; ".join(
        f"{r['instances']} instances: TTFT p50 {fmt(gb.ratio(r['ttft_p50'], base['ttft_p50']), 2)}x, p99 "
        f"{fmt(gb.ratio(r['ttft_p99'], base['ttft_p99']), 2)}x, nginx CPU per request "
        f"{fmt(gb.ratio(r['nginx_cpu_ms_per_request'], base['nginx_cpu_ms_per_request']), 2)}x"
        for r in rows[1:]) + ".")
    L.append("")
    L += gb.goals_table(32, goals(rows))
    L.append("Columns: catalogue fan-outs per interval = the `/api/tags` requests the instances got during a burst of "
             f"4 clients asking the gateway's `/api/tags` for {args.burst_seconds:g} s, divided by the instances and by "
             f"the cache lifetime ({args.catalogue_ttl:g} s) intervals the burst spanned; guard round = one "
             "`gateway_round()` of herd-guard (roles/guard/files/herd_guard.py) with the role's defaults: read the "
             "gateway's /herd/pools, probe every instance, judge; reload = SIGHUP to nginx's master until every "
             "worker is new and the gateway answers; nginx PSS = proportional set size of master and workers "
             "(shared zones split between them); render = role gateway's tasks through ansible-playbook.")
    L.append("")
    return "\n".join(L)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="quick pass for make unit: sizes 4 and 16, 40 requests")
    p.add_argument("--sizes", default="8,64,512", help="instance counts, smallest first")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), help="report folder")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp dir)")
    p.add_argument("--num-parallel", type=int, default=2, help="OLLAMA_NUM_PARALLEL (slots) of each instance")
    p.add_argument("--per-process", type=int, default=128, help="instances served by one emulator process")
    p.add_argument("--token-seconds", type=float, default=0.005, help="emulated seconds per token per slot")
    p.add_argument("--tokens", type=int, default=20, help="answer length of every request")
    p.add_argument("--concurrency", type=int, default=8, help="clients of every load run")
    p.add_argument("--requests", type=int, default=400, help="requests of every load run through the gateway")
    p.add_argument("--burst-seconds", type=float, default=6.0, help="length of the catalogue burst")
    p.add_argument("--catalogue-ttl", type=float, default=2.0, help="the gateway's catalogue cache (role default)")
    p.add_argument("--nginx-workers", default="2", help="worker_processes")
    p.add_argument("--max-run-seconds", type=float, default=120.0, help="bound of every load run")
    p.add_argument("--command", default=None, help="command line recorded in the report")
    a = p.parse_args(argv)
    if a.short:
        a.sizes, a.requests, a.burst_seconds, a.per_process = "4,16", 40, 4.5, 8
    a.sizes = [int(x) for x in str(a.sizes).split(",") if x]
    if a.sizes != sorted(a.sizes) or not a.sizes or a.sizes[0] < 1:
        p.error("--sizes: instance counts, smallest first")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    own_work = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="herd-scale-")
    Path(args.work, "tmp").mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    command = args.command or "python3 benchmarks/scale_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    facts = gb.machine_facts()
    guard_interval = yaml.safe_load((ROOT / "roles" / "guard" / "defaults" / "main.yml").read_text())[
        "guard_interval"]
    scale = Scale(args)
    t0 = time.monotonic()
    rows = []
    try:
        for size in args.sizes:
            row = scale.size_run(size)
            row["guard_interval"] = guard_interval
            rows.append(row)
    finally:
        scale.procs.stop_all()
    took = time.monotonic() - t0
    md = report(rows, args, facts, command, started, took)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{started[:10]}-scale"
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "settings": vars(args), "facts": facts,
                                                     "goals": [{"goal": g, "measured": v, "met": ok}
                                                               for g, v, ok in goals(rows)],
                                                     "command": command, "started": started, "took_s": took},
                                                    indent=1, default=str) + "\n")
    log(f"report: {stem}.md ({took:.0f} s)")
    if own_work:
        shutil.rmtree(args.work, ignore_errors=True)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
