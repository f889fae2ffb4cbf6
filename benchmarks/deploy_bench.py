#!/usr/bin/env python3
"""herd's deployment benchmark (issue 32, deployment at scale): site.yml and rolling.yml on one gateway and N GPU
hosts, timed, with the rolling re-deploys under streaming load through the gateway.

The hosts are real systemd hosts: containers booted from herd-base:bookworm with scripts/lab.sh's docker run flags,
named herd-scale-gw and herd-scale-gpu1..N on the docker network herd-scale (its own subnet), labelled
herd.scale=1. Each GPU host gets a simulated GPU spec of 2 GPUs (lab/gpus/l20x4.json, its first two) and one instance
per GPU; the model is the lab's smallest (herd-tiny:1b). The benchmark writes its own inventory (a hosts file, the
lab's group_vars linked as the molecule scenarios link them), runs playbooks/lab.yml (the stand-ins), then site.yml,
timed: wall time, and per host the time Ansible spent on that host's tasks (a callback, benchmarks/callback_plugins/
herd_deploy_timing.py, records each task's start and end on each host), with forks and pipelining as ansible.cfg
sets them. It checks the gateway (/api/version, one /api/generate) and that every instance is in /herd/pools,
neither down nor drained. Then, under bounded streaming load through the gateway (tools/herd_load.py inside the
gateway host, as molecule/multihost runs it), it runs playbooks/rolling.yml with a change that restarts every
instance (ollama_num_parallel, alternating 3 and 2) one host at a time, then in batches (herd_rolling_serial=25%,
then 50%): time, per-batch times, requests, answered, failed. It measures the hosts' memory and idle CPU, how many
such hosts this machine holds, and extrapolates (a model, labelled as such) to 64 hosts. It always removes what it
created (try/finally; --down removes leftovers).

Usage:
  python3 benchmarks/deploy_bench.py --gpu-hosts 8 --out docs/benchmarks/2026-12-03-deploy
  python3 benchmarks/deploy_bench.py --dry-run          # the inventory and the plan of commands, no docker
  python3 benchmarks/deploy_bench.py --render X.json --out X   # the report again from a recorded run
  python3 benchmarks/deploy_bench.py --down             # remove every herd-scale host and the network
Load goes only to the benchmark's own gateway container (127.0.0.1 inside it); every load run is bounded in
requests and seconds.
"""

from __future__ import annotations

import argparse
import configparser
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "herd-scale"
NETWORK = PREFIX
LABEL_KEY = "herd.scale"
LABEL = f"{LABEL_KEY}=1"
DEFAULT_SUBNET = "172.29.220.0/24"  # scripts/lab.sh uses 172.29.213.0/24
IMAGE = "herd-base:bookworm"
MODEL = "herd-tiny:1b"
SPEC_SOURCE = ROOT / "lab" / "gpus" / "l20x4.json"
GPUS_PER_HOST = 2
ROLL_PLAY = "Roll the GPU hosts"
CALLBACK = "herd_deploy_timing"
# scripts/lab.sh's boot_host: systemd as PID 1 in the container (../shared/TESTBED.md).
DOCKER_RUN_FLAGS = [
    "--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    "--tmpfs", "/run", "--tmpfs", "/tmp", "--stop-signal", "SIGRTMIN+3",
]
LOAD_PID = "/root/deploy-load.pid"
EXTRAPOLATE_TO = 64


def venv_bin() -> Path:
    """The folder of ansible-playbook: beside this Python (the project's .venv, also when run from a worktree), else
    the checkout's .venv."""
    here = Path(sys.executable).parent
    return here if (here / "ansible-playbook").exists() else ROOT / ".venv" / "bin"


def log(msg: str) -> None:
    print(f"[deploy-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cmd_out(argv: list[str], timeout: float = 30) -> str:
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (run.stdout + run.stderr).strip() if run.returncode == 0 else ""


# ---------------------------------------------------------------- names, inventory, settings


def gateway_name() -> str:
    return f"{PREFIX}-gw"


def gpu_names(n: int) -> list[str]:
    return [f"{PREFIX}-gpu{i}" for i in range(1, n + 1)]


def ansible_settings(cfg_path: Path = ROOT / "ansible.cfg", env: dict | None = None) -> dict:
    """forks and pipelining as ansible-playbook will run them: ansible.cfg, unless ANSIBLE_FORKS/ANSIBLE_PIPELINING
    override it."""
    env = os.environ if env is None else env
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    cp.read(cfg_path)
    forks = int(env.get("ANSIBLE_FORKS") or cp.get("defaults", "forks", fallback="5"))
    raw = env.get("ANSIBLE_PIPELINING") or cp.get("defaults", "pipelining", fallback=None) or cp.get(
        "ssh_connection", "pipelining", fallback="False")
    return {"forks": forks, "pipelining": str(raw).strip().lower() in ("1", "true", "yes", "on"),
            "source": "ANSIBLE_FORKS/ANSIBLE_PIPELINING" if env.get("ANSIBLE_FORKS") or env.get(
                "ANSIBLE_PIPELINING") else str(cfg_path.relative_to(ROOT) if cfg_path.is_relative_to(ROOT) else cfg_path)}


def gpu_spec(source: Path = SPEC_SOURCE, gpus: int = GPUS_PER_HOST) -> dict:
    """A lab GPU spec of `gpus` GPUs: the first ones of `source`."""
    spec = json.loads(source.read_text())
    spec["gpus"] = spec["gpus"][:gpus]
    name = spec["gpus"][0]["name"] if spec["gpus"] else "GPU"
    spec["description"] = f"herd lab stand-in: {gpus}x {name} (benchmarks/deploy_bench.py: the first {gpus} of {source.name})"
    return spec


def inventory(n: int, spec_path: Path, subnet: str) -> dict:
    """The hosts file: one gateway, n GPU hosts with 2 simulated GPUs and one instance on each, as
    molecule/multihost's host_vars give its hosts."""
    return {"all": {
        "vars": {"ansible_connection": "community.docker.docker", "ansible_python_interpreter": "/usr/bin/python3"},
        "children": {"lab": {
            # Meant to allow this network too; inventories/lab/group_vars/all.yml wins over a hosts file's group vars,
            # so the lab's value stays (the benchmark only uses the gateway's loopback, through docker exec).
            "vars": {"gateway_allow": ["127.0.0.1/32", subnet]},
            "children": {
                "gateways": {"hosts": {gateway_name(): {}}},
                "ollama_hosts": {
                    "vars": {"lab_standins_gpu_spec_file": str(spec_path),
                             "ollama_gpu_groups": [[i] for i in range(GPUS_PER_HOST)]},
                    "hosts": {h: {} for h in gpu_names(n)},
                },
            },
        }},
    }}


def write_inventory(work: Path, n: int, subnet: str) -> Path:
    """work/inventory/{hosts.yml, group_vars -> inventories/lab/group_vars} and work/gpus/l20x2.json."""
    spec_path = work / "gpus" / f"l20x{GPUS_PER_HOST}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(gpu_spec(), indent=2) + "\n")
    inv = work / "inventory"
    inv.mkdir(parents=True, exist_ok=True)
    header = ("# Written by benchmarks/deploy_bench.py: one gateway and the GPU hosts it booted (docker network "
              f"{NETWORK}).\n")
    (inv / "hosts.yml").write_text(header + yaml.safe_dump(inventory(n, spec_path, subnet), sort_keys=False,
                                                          default_flow_style=None))
    link = inv / "group_vars"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT / "inventories" / "lab" / "group_vars", target_is_directory=True)
    return inv


def serial_batch(serial: str, hosts: int) -> int:
    """Hosts per batch of Ansible's `serial` (a number or a percentage; a percentage rounds down, at least 1)."""
    s = str(serial).strip()
    if s.endswith("%"):
        return max(1, min(hosts, int(hosts * float(s[:-1]) / 100)))
    return max(1, min(hosts, int(s)))


def waves(hosts: int, forks: int) -> int:
    """Rounds of forks a task needs on `hosts` hosts."""
    return max(1, math.ceil(hosts / max(1, forks)))


# ---------------------------------------------------------------- the callback's timing, pure


def union_s(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def host_times(timing: dict) -> dict:
    """Per host: the time its tasks ran (the union of each task's start..end on that host), how many tasks ran on it
    (skipped ones included) and how many changed."""
    by_host: dict[str, list] = {}
    for t in timing.get("tasks", []):
        if t.get("end") is None:
            continue
        by_host.setdefault(t["host"], []).append(t)
    out = {}
    for host, tasks in sorted(by_host.items()):
        out[host] = {
            "busy_s": round(union_s([(t["start"], t["end"]) for t in tasks]), 2),
            "tasks": len(tasks),
            "skipped": sum(1 for t in tasks if t["status"] == "skipped"),
            "changed": sum(1 for t in tasks if t["status"] == "changed"),
        }
    return out


def play_spans(timing: dict) -> list[dict]:
    """Every play start (one per serial batch) with its length (to the next play's start, the last to the run's end)
    and the hosts its tasks ran on."""
    plays = timing.get("plays", [])
    if timing.get("finished") is False and plays:
        plays = plays[:-1]  # a run stopped halfway: its last play had not ended
    hosts: dict[int, set] = {}
    for t in timing.get("tasks", []):
        hosts.setdefault(t["play"], set()).add(t["host"])
    out = []
    for i, p in enumerate(plays):
        end = plays[i + 1]["start"] if i + 1 < len(plays) else timing.get("ended", p["start"])
        out.append({"name": p["name"], "start_s": round(p["start"] - timing["started"], 2),
                    "s": round(end - p["start"], 2), "hosts": sorted(hosts.get(i, ()))})
    return out


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "min": None, "max": None}
    return {"n": len(values), "mean": round(sum(values) / len(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def split_hosts(hosts: dict, gw: str) -> tuple[dict, dict]:
    gpus = {h: v for h, v in hosts.items() if h != gw and h.startswith(f"{PREFIX}-gpu")}
    return gpus, {h: v for h, v in hosts.items() if h == gw}


# ---------------------------------------------------------------- machine measurements


def to_mib(text: str) -> float | None:
    """docker stats' memory figure ("123.4MiB", "1.2GiB", "512KiB") in MiB."""
    m = re.match(r"\s*([\d.]+)\s*([KMG]i?B|B)", text)
    if not m:
        return None
    scale = {"B": 1 / 2**20, "KiB": 1 / 1024, "KB": 1 / 1024, "MiB": 1, "MB": 1, "GiB": 1024, "GB": 1024}[m.group(2)]
    return round(float(m.group(1)) * scale, 1)


def meminfo() -> dict:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024
    return out


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def daemon_cpu_s() -> float:
    """CPU seconds used so far by dockerd, containerd and the containers' shims."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            comm = (d / "comm").read_text().strip()
            if comm in ("dockerd", "containerd") or comm.startswith("containerd-shim"):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / tck


class Sampler:
    """The machine's CPU busy share and MemAvailable, once a second, while a playbook runs."""

    def __init__(self, step: float = 1.0):
        self.step, self.busy, self.avail = step, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        prev = cpu_ticks()
        while not self._stop.wait(self.step):
            cur = cpu_ticks()
            if cur[1] > prev[1]:
                self.busy.append((cur[0] - prev[0]) / (cur[1] - prev[1]))
            prev = cur
            self.avail.append(meminfo()["MemAvailable"])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        b = sorted(self.busy)
        return {
            "busy_mean": round(sum(b) / len(b), 3) if b else None,
            "busy_p50": round(b[len(b) // 2], 3) if b else None,
            "seconds_over_90pct": sum(1 for x in b if x >= 0.9),
            "seconds": len(b),
            "mem_available_min_mib": round(min(self.avail) / 2**20) if self.avail else None,
        }


def machine_facts() -> dict:
    model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    status = cmd_out(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "cpu": model.group(1).strip() if model else platform.processor(),
        "memory_gib": round(meminfo()["MemTotal"] / 2**30, 1),
        "kernel": platform.release(),
        "os": cmd_out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "docker": cmd_out(["docker", "version", "--format", "{{.Server.Version}}"]),
        "ansible_core": (cmd_out([str(venv_bin() / "ansible-playbook"), "--version"]).splitlines()
                         or ["?"])[0],
        "python": platform.python_version(),
        "herd_commit": cmd_out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "herd_dirty": bool(status),
    }


# ---------------------------------------------------------------- the run


class Bench:
    def __init__(self, args):
        self.a = args
        self.n = args.gpu_hosts
        self.gw = gateway_name()
        self.gpus = gpu_names(self.n)
        self.hosts = [self.gw, *self.gpus]
        self.work = Path(args.work)
        self.inv = write_inventory(self.work, self.n, args.subnet)
        self.ids: dict[str, str] = {}
        self.rec: dict = {}
        self.bin = venv_bin()
        self.stopped: BaseException | None = None

    # -- plan (also what --dry-run prints)
    def docker_run_argv(self, host: str) -> list[str]:
        return ["docker", "run", "-d", "--name", host, "--hostname", host, "--network", NETWORK, *DOCKER_RUN_FLAGS,
                "--label", LABEL, self.a.image]

    def playbook_argv(self, playbook: str, *extra: str) -> list[str]:
        return [str(self.bin / "ansible-playbook"), "-i", str(self.inv), str(ROOT / playbook), *extra]

    def plan(self) -> list[tuple[str, list[str]]]:
        steps = [("network", ["docker", "network", "create", "--subnet", self.a.subnet, "--label", LABEL, NETWORK])]
        steps += [(f"boot {h}", self.docker_run_argv(h)) for h in self.hosts]
        steps += [("stand-ins", self.playbook_argv("playbooks/lab.yml")), ("site", self.playbook_argv("site.yml"))]
        value = 3
        for serial in self.a.serials:
            steps.append((f"load during rolling serial={serial}", self.load_argv("/root/deploy-load-x.json", 600)))
            steps.append((f"rolling serial={serial}", self.playbook_argv(
                "playbooks/rolling.yml", "-e", f"herd_rolling_serial={serial}", "-e", f"ollama_num_parallel={value}")))
            value = 5 - value
        steps.append(("down", ["docker", "rm", "-f", *self.hosts]))
        steps.append(("down", ["docker", "network", "rm", NETWORK]))
        return steps

    def load_argv(self, out: str, duration: float) -> list[str]:
        a = self.a
        inner = (f"echo $$ > {LOAD_PID}; exec python3 /root/herd_load.py --url http://127.0.0.1 --model {MODEL} "
                 f"--concurrency {a.load_concurrency} --requests {a.load_requests} --duration {int(duration)} "
                 f"--timeout 120 --stream --prompt-mix short:16:24:1 --progress 0 --quiet --no-samples --json {out}")
        return ["docker", "exec", self.gw, "sh", "-c", inner]

    # -- helpers
    def run(self, argv, timeout=120, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:6])}... exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
        return proc

    def sh(self, host: str, cmd: str, timeout=60, check=True) -> str:
        return self.run(["docker", "exec", host, "bash", "-c", cmd], timeout=timeout, check=check).stdout

    def env(self, timing: Path) -> dict:
        env = dict(os.environ)
        env.update({"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_CALLBACK_PLUGINS": str(
            ROOT / "benchmarks" / "callback_plugins"), "ANSIBLE_CALLBACKS_ENABLED": CALLBACK,
            "HERD_DEPLOY_TIMING": str(timing), "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1",
            "PATH": f"{self.bin}:{env.get('PATH', '')}"})
        return env

    def container_cpu_s(self) -> float:
        total = 0.0
        for cid in self.ids.values():
            for base in ("cpuacct", "cpu,cpuacct"):
                p = Path(f"/sys/fs/cgroup/{base}/docker/{cid}/cpuacct.usage")
                if p.exists():
                    total += int(p.read_text()) / 1e9
                    break
        return total

    # -- phases
    def boot(self) -> dict:
        before = meminfo()["MemAvailable"]
        t0 = time.monotonic()
        if self.run(["docker", "network", "inspect", NETWORK], check=False).returncode != 0:
            self.run(["docker", "network", "create", "--subnet", self.a.subnet, "--label", LABEL, NETWORK])
        for h in self.hosts:
            if self.run(["docker", "container", "inspect", h], check=False).returncode == 0:
                self.run(["docker", "start", h])
            else:
                self.run(self.docker_run_argv(h))
        states = {}
        deadline = time.monotonic() + 180
        pending = set(self.hosts)
        while pending and time.monotonic() < deadline:
            for h in sorted(pending):
                state = self.run(["docker", "exec", h, "systemctl", "is-system-running"], check=False).stdout.strip()
                states[h] = state
                if state in ("running", "degraded"):
                    pending.discard(h)
            if pending:
                time.sleep(1)
        if pending:
            raise RuntimeError(f"hosts did not finish booting: {sorted(pending)} ({states})")
        took = time.monotonic() - t0
        self.inspect_ids()
        time.sleep(5)
        mem = self.memory()
        return {"s": round(took, 1), "hosts": len(self.hosts), "states": states,
                "mem_available_before_mib": round(before / 2**20),
                "mem_available_after_mib": round(meminfo()["MemAvailable"] / 2**20), "memory": mem}

    def inspect_ids(self):
        for h in self.hosts:
            self.ids[h] = self.run(["docker", "inspect", "-f", "{{.Id}}", h]).stdout.strip()

    def playbook(self, label: str, playbook: str, *extra: str, timeout: float = 3600) -> dict:
        timing_path = self.work / f"timing-{label}.json"
        log_path = self.work / f"ansible-{label}.log"
        argv = self.playbook_argv(playbook, *extra)
        log(f"{label}: {' '.join(argv[1:])}")
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        c0, d0 = self.container_cpu_s(), daemon_cpu_s()
        t0 = time.monotonic()
        rc, stopped = None, None
        with Sampler() as smp, open(log_path, "w") as fh:
            try:
                rc = subprocess.run(argv, cwd=ROOT, env=self.env(timing_path), stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except BaseException as exc:  # noqa: BLE001 - stopped (SIGTERM, timeout): record what ran, then re-raise
                stopped = exc
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = {
            "playbook": playbook, "extra": list(extra), "rc": rc, "wall_s": round(wall, 1),
            "controller_cpu_s": round((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime), 1),
            "containers_cpu_s": round(self.container_cpu_s() - c0, 1),
            "docker_daemons_cpu_s": round(daemon_cpu_s() - d0, 1),
            "machine": smp.summary(),
        }
        text = log_path.read_text(errors="replace")
        out["recap_text"] = text[text.rfind("PLAY RECAP"):].strip()[:4000] if "PLAY RECAP" in text else ""
        if rc != 0:
            out["tail"] = text[-6000:]
        if stopped is not None:
            out["stopped"] = f"{type(stopped).__name__} {stopped}"
            self.stopped = stopped
        if timing_path.exists():
            timing = json.loads(timing_path.read_text())
            out["plays"] = play_spans(timing)
            out["hosts"] = host_times(timing)
            out["recap"] = timing.get("recap", {})
            out["host_tasks"] = sum(h["tasks"] for h in out["hosts"].values())
        if self.a.keep_logs:
            out["log"] = str(log_path)
        log(f"{label}: rc {rc}, {wall:.0f} s")
        return out

    def pools(self) -> dict:
        return json.loads(self.sh(self.gw, "curl -sf http://127.0.0.1/herd/pools"))

    def checks(self) -> dict:
        version = self.sh(self.gw, "curl -sf http://127.0.0.1/api/version", check=False).strip()
        body = json.dumps({"model": MODEL, "prompt": "Hello from the deployment benchmark", "stream": False,
                           "options": {"num_predict": 8}})
        gen = self.sh(self.gw, f"curl -s -o /root/gen.json -w '%{{http_code}}' http://127.0.0.1/api/generate -d '{body}'"
                      " && echo && cat /root/gen.json", check=False)
        status, _, answer = gen.partition("\n")
        try:
            done = json.loads(answer).get("done") is True
        except ValueError:
            done = False
        inst = self.pools().get("instances", [])
        return {"version": version, "generate_status": status.strip(), "generate_done": done,
                "instances": len(inst), "expected_instances": self.n * GPUS_PER_HOST,
                "down": sum(1 for i in inst if i.get("down")), "drained": sum(1 for i in inst if i.get("drained")),
                "max_conns": sorted({i.get("max_conns") for i in inst})}

    def memory(self) -> dict:
        """Per host: memory as docker stats counts it (cgroup usage less inactive file pages), rss and page cache."""
        out = {}
        for h, cid in self.ids.items():
            base = Path(f"/sys/fs/cgroup/memory/docker/{cid}")
            try:
                st = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
                usage = int((base / "memory.usage_in_bytes").read_text())
            except (OSError, ValueError):
                continue
            inactive = int(st.get("total_inactive_file", 0))
            out[h] = {"used_mib": round((usage - inactive) / 2**20, 1), "rss_mib": round(int(st.get("total_rss", 0)) / 2**20, 1),
                      "cache_mib": round(int(st.get("total_cache", 0)) / 2**20, 1)}
        if not out:  # no cgroup v1 memory files here: docker stats' own figure
            for h, v in self.docker_stats().items():
                mib = to_mib(v["mem"])
                if mib is not None:
                    out[h] = {"used_mib": mib, "source": "docker stats"}
        return out

    def docker_stats(self) -> dict:
        text = self.run(["docker", "stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}\t{{.CPUPerc}}",
                         *self.hosts], timeout=120, check=False).stdout
        out = {}
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                out[parts[0]] = {"mem": parts[1].split("/")[0].strip(), "cpu": parts[2]}
        return out

    def idle_cpu(self, seconds: float) -> dict:
        per0 = {h: self._cpu_of(cid) for h, cid in self.ids.items()}
        m0 = cpu_ticks()
        time.sleep(seconds)
        m1 = cpu_ticks()
        per = {h: round((self._cpu_of(cid) - per0[h]) / seconds, 4) for h, cid in self.ids.items()}
        return {"seconds": seconds, "cores_per_host": per,
                "machine_busy": round((m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 3)}

    @staticmethod
    def _cpu_of(cid: str) -> float:
        for base in ("cpuacct", "cpu,cpuacct"):
            p = Path(f"/sys/fs/cgroup/{base}/docker/{cid}/cpuacct.usage")
            if p.exists():
                return int(p.read_text()) / 1e9
        return 0.0

    def instance_starts(self) -> dict:
        """Per GPU host: each instance unit's ActiveEnterTimestampMonotonic (changes when it restarts)."""
        out = {}
        for h in self.gpus:
            text = self.sh(h, "for u in $(systemctl list-units --plain --no-legend --all 'ollama@*.service' | "
                              "awk '{print $1}'); do systemctl show -p Id -p ActiveEnterTimestampMonotonic \"$u\"; "
                              "echo; done", check=False)
            units, cur = {}, {}
            for line in text.splitlines() + [""]:
                if not line.strip():
                    if "Id" in cur:
                        units[cur["Id"]] = cur.get("ActiveEnterTimestampMonotonic")
                    cur = {}
                    continue
                k, _, v = line.partition("=")
                cur[k] = v
            out[h] = units
        return out

    def rolling(self, serial: str, value: int, index: int) -> dict:
        a = self.a
        out_json = f"/root/deploy-load-{index}.json"
        self.run(["docker", "cp", str(ROOT / "tools" / "herd_load.py"), f"{self.gw}:/root/herd_load.py"])
        starts0 = self.instance_starts()
        load = subprocess.Popen(self.load_argv(out_json, a.load_max_seconds), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(3)
            res = self.playbook(f"rolling-{index}", "playbooks/rolling.yml", "-e", f"herd_rolling_serial={serial}",
                                "-e", f"ollama_num_parallel={value}", timeout=a.load_max_seconds + 600)
            time.sleep(3)
        finally:
            # Issue no new request; the ones in flight finish and are counted (herd_load on SIGTERM).
            self.sh(self.gw, f"kill -TERM $(cat {LOAD_PID}) 2>/dev/null || true", check=False)
            try:
                _, err = load.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                load.kill()
                _, err = load.communicate()
        try:
            summary = json.loads(self.sh(self.gw, f"cat {out_json}"))["summary"]
            res["load"] = {k: summary[k] for k in ("requests", "ok", "errors", "errors_by_status", "wall_s",
                                                  "req_per_s")}
            res["load"]["latency_p99_s"] = summary["latency_s"]["p99"]
            res["load"]["ttft_p99_s"] = summary["ttft_s"]["p99"]
        except (RuntimeError, ValueError, KeyError) as exc:
            res["load"] = {"error": f"no load result: {exc}; {err[-500:] if err else ''}"}
        res["serial"] = serial
        res["batch_hosts"] = serial_batch(serial, self.n)
        res["num_parallel"] = value
        plays = res.get("plays", [])
        res["batches"] = [{"s": p["s"], "hosts": p["hosts"]} for p in plays if p["name"] == ROLL_PLAY]
        res["overhead_s"] = round(res["wall_s"] - sum(b["s"] for b in res["batches"]), 1)
        # Every instance restarted with the new value; none left drained.
        starts1 = self.instance_starts()
        env = {h: sorted(set(re.findall(r'OLLAMA_NUM_PARALLEL="?(\d+)', self.sh(
            h, "cat /etc/herd/ollama/*.env", check=False)))) for h in self.gpus}
        inst = self.pools().get("instances", [])
        res["verify"] = {
            "restarted": sum(1 for h in self.gpus for u, v in starts1.get(h, {}).items()
                             if v and starts0.get(h, {}).get(u) != v),
            "instances": sum(len(u) for u in starts1.values()),
            "env_ok": all(v == [str(value)] for v in env.values()),
            "gateway_max_conns": sorted({i.get("max_conns") for i in inst}),
            "drained": sum(1 for i in inst if i.get("drained")),
            "down": sum(1 for i in inst if i.get("down")),
        }
        return res

    def teardown(self) -> None:
        teardown()


def teardown() -> None:
    """Remove every container and network labelled herd.scale=1 (and named herd-scale*)."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={LABEL}", "--filter", f"name={PREFIX}-"],
                         capture_output=True, text=True).stdout.split()
    if ids:
        log(f"removing {len(ids)} {PREFIX} hosts")
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, text=True, timeout=300)
    nets = subprocess.run(["docker", "network", "ls", "-q", "--filter", f"label={LABEL}", "--filter",
                           f"name={PREFIX}"], capture_output=True, text=True).stdout.split()
    for net in nets:
        subprocess.run(["docker", "network", "rm", net], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------- analysis (pure: from the record)


def scaled_play_s(play: dict, n: int, big: int, forks: int, gw: str) -> float:
    """A play's time at `big` GPU hosts: as many rounds of forks as its hosts need there, each as long as here."""
    hosts = play["hosts"]
    gpus = [h for h in hosts if h != gw]
    if len(hosts) <= 1:
        return play["s"]
    here = len(hosts)
    there = round(len(gpus) * big / n) + (len(hosts) - len(gpus))
    return play["s"] * waves(there, forks) / waves(here, forks)


def fit(rec: dict) -> dict:
    """How many GPU hosts like these this machine holds: by memory (what was available before boot, less the
    controller's transient during site.yml, over one GPU host's memory) and by idle CPU (hosts whose idle work takes
    at most half the cores)."""
    mem = rec.get("memory_deployed") or {}
    gw = gateway_name()
    per_gpu = [v["used_mib"] for h, v in mem.items() if h != gw]
    out: dict = {"per_gpu_host_mib": stats(per_gpu), "gateway_mib": mem.get(gw, {}).get("used_mib")}
    boot = rec.get("boot") or {}
    site = rec.get("site") or {}
    avail0 = boot.get("mem_available_before_mib")
    low = (site.get("machine") or {}).get("mem_available_min_mib")
    after = rec.get("mem_available_deployed_mib")
    if per_gpu and avail0:
        transient = max(0, (after or low or 0) - (low or after or 0))
        gw_mib = out["gateway_mib"] or 0
        out["controller_transient_mib"] = transient
        out["by_memory"] = int((avail0 - transient - gw_mib) // max(per_gpu))
    idle = (rec.get("idle_cpu") or {}).get("cores_per_host", {})
    per_cpu = [v for h, v in idle.items() if h != gw]
    cores = (rec.get("facts") or {}).get("nproc") or 1
    if per_cpu:
        out["idle_cores_per_gpu_host"] = stats(per_cpu)
        out["by_idle_cpu"] = math.floor(0.5 * cores / max(max(per_cpu), 1e-4) + 1e-9)
    limits = [v for k, v in out.items() if k.startswith("by_")]
    out["hosts"] = min(limits) if limits else None
    return out


def extrapolate(rec: dict, big: int = EXTRAPOLATE_TO) -> dict:
    """A model, not a measurement: each play at `big` GPU hosts takes as many rounds of forks (ceil(hosts / forks))
    as its hosts need there, each round as long as the measured play; the rolling runs' batches scale in number.
    Also the controller's CPU at that size (its measured CPU per host-task times the host-tasks there) over the
    machine's cores: the least wall time this controller would need."""
    s = rec.get("settings", {})
    n, forks, gw = s.get("gpu_hosts"), s.get("forks", 5), gateway_name()
    cores = (rec.get("facts") or {}).get("nproc") or 1
    out: dict = {"hosts": big, "forks": forks}
    site = rec.get("site") or {}
    if not n or not site.get("plays"):
        return out
    played = sum(p["s"] for p in site["plays"])
    startup = max(0.0, site["wall_s"] - played)
    site_big = startup + sum(scaled_play_s(p, n, big, forks, gw) for p in site["plays"])
    ht = site.get("hosts", {})
    gpu_tasks = sum(v["tasks"] for h, v in ht.items() if h != gw)
    gw_tasks = sum(v["tasks"] for h, v in ht.items() if h == gw)
    tasks_big = gw_tasks + gpu_tasks * big / n
    cpu_per_task = site["controller_cpu_s"] / max(1, gw_tasks + gpu_tasks)
    controller_floor = cpu_per_task * tasks_big / cores
    out["site"] = {"forks_model_s": round(site_big), "controller_cpu_s": round(cpu_per_task * tasks_big),
                   "controller_floor_s": round(controller_floor), "s": round(max(site_big, controller_floor)),
                   "controller_cpu_per_host_task_s": round(cpu_per_task, 3),
                   # This lab, where hosts and controller share the cores and site.yml kept them busy: the wall time
                   # grows with the host-tasks.
                   "this_machine_s": round(site["wall_s"] * tasks_big / max(1, gw_tasks + gpu_tasks)),
                   "host_tasks": round(tasks_big)}
    oat = one_at_a_time(rec)
    if not oat:
        return out
    b1 = oat["batch_s"]
    full = oat["overhead_run"]
    over_plays = [p for p in full["plays"] if p["name"] != ROLL_PLAY]
    startup_r = max(0.0, full["wall_s"] - sum(p["s"] for p in full["plays"]))
    overhead_big = startup_r + sum(scaled_play_s(p, n, big, forks, gw) for p in over_plays)
    # A batch of k hosts: measured here for the batch sizes run; growth per extra host in a batch from the largest.
    per_batch = {1: b1}
    for r in rec.get("rolling", []):
        if r.get("batches") and r["batch_hosts"] > 1:
            per_batch[r["batch_hosts"]] = sum(b["s"] for b in r["batches"]) / len(r["batches"])
    k_max = max(per_batch)
    growth = (per_batch[k_max] - b1) / (k_max - 1) if k_max > 1 else 0.0
    roll_cpu_per_host = full["controller_cpu_s"] / n  # a finished run: its CPU over its hosts
    out["rolling"] = {"one_batch_s": round(b1, 1), "overhead_s": round(overhead_big), "per_batch_measured": {
        str(k): round(v, 1) for k, v in sorted(per_batch.items())}, "growth_per_host_in_batch_s": round(growth, 1)}
    runs = {}
    for serial in ("1", "25%", "50%"):
        k = serial_batch(serial, big)
        nb = math.ceil(big / k)
        # Hosts with their own CPUs: a batch of k costs rounds of forks of one host's roll (low); everything on one
        # machine like this lab: each extra host in a batch adds what it added here (high); and never less than
        # the controller's CPU for the batch over the cores.
        low = max(b1 * waves(k, forks), roll_cpu_per_host * k / cores)
        high = max(b1 + growth * (k - 1), low)
        runs[serial] = {"batch_hosts": k, "batches": nb, "low_s": round(overhead_big + nb * low),
                        "high_s": round(overhead_big + nb * high)}
    for serial in ("25%", "50%"):
        runs[serial]["ratio_low"] = round(runs[serial]["low_s"] / runs["1"]["low_s"], 2)
        runs[serial]["ratio_high"] = round(runs[serial]["high_s"] / runs["1"]["high_s"], 2)
    out["rolling"]["runs"] = runs
    return out


def one_at_a_time(rec: dict) -> dict | None:
    """The one-at-a-time rolling run: measured when it finished; when it was stopped after some batches, estimated
    as the part outside the batches of a finished run (the same plays) plus the hosts times its mean batch."""
    rolls = rec.get("rolling", [])
    n = (rec.get("settings") or {}).get("gpu_hosts") or 0
    one = next((r for r in rolls if r.get("serial") == "1" and r.get("batches")), None)
    if one is None:
        return None
    b1 = sum(b["s"] for b in one["batches"]) / len(one["batches"])
    if one.get("rc") == 0:
        return {"run": one, "overhead_run": one, "batch_s": b1, "s": one["wall_s"], "measured": True,
                "batches_measured": len(one["batches"])}
    full = next((r for r in rolls if r.get("rc") == 0 and r.get("plays")), None)
    if full is None:
        return None
    return {"run": one, "overhead_run": full, "batch_s": b1, "s": round(full["overhead_s"] + n * b1, 1),
            "measured": False, "batches_measured": len(one["batches"]), "overhead_s": full["overhead_s"],
            "overhead_serial": full["serial"]}


def expected_s(rolls: list[dict], k: int, n: int) -> float:
    """A rolling run's expected seconds with k hosts a batch, from the runs so far (the first one at a time): the
    part outside the batches, plus n / k batches, each one host's batch plus what each extra host added in the
    largest batch measured (half a host's batch when none was), plus a minute."""
    done = [r for r in rolls if r.get("batches")]
    one = next(r for r in done if r["batch_hosts"] == 1)
    b1 = sum(b["s"] for b in one["batches"]) / len(one["batches"])
    big = max(done, key=lambda r: r["batch_hosts"])
    kb = big["batch_hosts"]
    growth = ((sum(b["s"] for b in big["batches"]) / len(big["batches"]) - b1) / (kb - 1)) if kb > 1 else 0.5 * b1
    return max(r["overhead_s"] for r in done) + math.ceil(n / k) * (b1 + max(0.0, growth) * (k - 1)) + 60


# ---------------------------------------------------------------- report


def fmt_s(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} s" if v >= 10 else f"{v:.1f} s"


def render(rec: dict) -> str:
    f = rec.get("facts", {})
    s = rec.get("settings", {})
    n = s.get("gpu_hosts")
    gw = gateway_name()
    L = [f"# herd deployment benchmark, lab, {rec.get('started', '?')[:10]}", ""]
    L.append(
        f"**Hosts are real, GPUs and inference are stand-ins.** One gateway and {n} GPU hosts, each a systemd "
        f"container booted from `{s.get('image')}` with scripts/lab.sh's flags on the docker network `{NETWORK}` "
        f"({s.get('subnet')}), all on this one machine. Each GPU host has a simulated spec of {GPUS_PER_HOST} GPUs "
        f"(the first {GPUS_PER_HOST} of lab/gpus/l20x4.json) and one instance on each GPU (`ollama_gpu_groups: "
        f"[[0], [1]]`, as molecule/multihost), serving `{MODEL}` from the lab registry with herd's Ollama emulator. "
        "The inventory is the benchmark's own hosts file with inventories/lab/group_vars linked, as the molecule "
        "scenarios link it; site.yml and rolling.yml run unchanged. All figures come from this one run on a shared "
        "2-core machine.")
    L += ["", f"Made with (from the repository root) at herd commit `{f.get('herd_commit', '?')}`"
          f"{' (with uncommitted changes)' if f.get('herd_dirty') else ''}:", "", "```sh", rec.get("command", ""),
          "```", ""]
    L.append(f"Machine: {f.get('nproc')} CPUs ({f.get('cpu')}), {f.get('memory_gib')} GiB, {f.get('os')}; docker "
             f"{f.get('docker')}; {f.get('ansible_core')}. Ansible settings ({s.get('settings_source')}): forks "
             f"{s.get('forks')}, pipelining {'on' if s.get('pipelining') else 'off'}, connection "
             "community.docker.docker (`docker exec` per module run). Wall time of the whole benchmark "
             f"{fmt_s(rec.get('took_s'))}.")
    if not rec.get("complete"):
        L += ["", "**This run did not complete.** " + "; ".join(rec.get("errors", [])[:3])]
    boot = rec.get("boot") or {}
    L += ["", "## site.yml on the hosts", ""]
    if boot:
        L.append(f"Booting the {boot.get('hosts')} hosts (docker run, then `systemctl is-system-running` = running or "
                 f"degraded on every one): {fmt_s(boot.get('s'))}. playbooks/lab.yml (the stand-ins): "
                 f"{fmt_s((rec.get('standins') or {}).get('wall_s'))}.")
        L.append("")
    site = rec.get("site") or {}
    if site:
        ht = site.get("hosts", {})
        gpus, gws = split_hosts(ht, gw)
        busy = stats([v["busy_s"] for v in gpus.values()])
        tasks = stats([v["tasks"] for v in gpus.values()])
        m = site.get("machine", {})
        L += ["| figure | value |", "|---|---|",
              f"| `ansible-playbook site.yml`, wall time | **{fmt_s(site.get('wall_s'))}** (exit {site.get('rc')}) |",
              f"| wall time per GPU host (wall / {n}) | {fmt_s(site['wall_s'] / n) if n else '-'} |",
              f"| time Ansible spent on each GPU host's tasks, mean (min-max) | {fmt_s(busy['mean'])} "
              f"({fmt_s(busy['min'])}-{fmt_s(busy['max'])}) |",
              f"| ... on the gateway's tasks | {fmt_s(gws.get(gw, {}).get('busy_s'))} |",
              f"| tasks run per GPU host (skipped included) / on the gateway | {tasks['mean']:.0f} / "
              f"{gws.get(gw, {}).get('tasks', '-')} |" if tasks["n"] else "| tasks | - |",
              f"| host-tasks in all | {site.get('host_tasks', '-')} |",
              f"| CPU: controller (ansible-playbook, its forks, docker CLI) / containers / dockerd+containerd | "
              f"{site.get('controller_cpu_s')} / {site.get('containers_cpu_s')} / {site.get('docker_daemons_cpu_s')} "
              "CPU-s |",
              f"| machine CPU busy during site.yml, mean / median of 1-s samples | {m.get('busy_mean')} / "
              f"{m.get('busy_p50')} ({m.get('seconds_over_90pct')} of {m.get('seconds')} s at 90% or more) |"]
        c = rec.get("site_checks") or {}
        if c:
            L += ["", f"Checks after site.yml: `/api/version` answered `{c.get('version')}`; one `/api/generate` "
                  f"answered {c.get('generate_status')} (done: {c.get('generate_done')}); `/herd/pools` lists "
                  f"{c.get('instances')} instances of {c.get('expected_instances')} expected, {c.get('down')} down, "
                  f"{c.get('drained')} drained, max_conns {c.get('max_conns')}."]
        plays = site.get("plays", [])
        if plays:
            L += ["", "Where the time went (each play from its start to the next one's; hosts = hosts its tasks "
                  "ran on):", "", "| play | hosts | time |", "|---|---|---|"]
            L += [f"| {p['name']} | {len(p['hosts'])} | {fmt_s(p['s'])} |" for p in plays]
        L += ["", "Per host: the callback benchmarks/callback_plugins/herd_deploy_timing.py records when each task "
              "started and ended on each host; a host's time is the union of those intervals (with forks above the "
              "host count every host runs each task at once, so each host's time is nearly the whole run: the "
              "hosts ran side by side, not one after another)."]
    rolls = rec.get("rolling", [])
    if rolls:
        L += ["", "## Rolling re-deploys under load", "",
              "Each run: `ansible-playbook playbooks/rolling.yml -e herd_rolling_serial=S -e ollama_num_parallel=V`, "
              "V alternating 3 and 2 so that every run changes every instance's settings (each instance restarts), "
              f"while tools/herd_load.py inside the gateway host streams `/api/generate` answers (closed loop, "
              f"{s.get('load_concurrency')} clients, 16-word prompts, 24 tokens), started 3 s before the playbook and "
              "stopped 3 s after it (no new request; those in flight finish and are counted).", "",
              "| serial | hosts per batch | batches | wall time | per batch mean (min-max) | outside the batches | "
              "requests | answered | failed | restarted | exit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rolls:
            ld = r.get("load", {})
            b = stats([x["s"] for x in r.get("batches", [])])
            v = r.get("verify", {})
            L.append(f"| {r['serial']} | {r.get('batch_hosts')} | {b['n']} | **{fmt_s(r.get('wall_s'))}** | "
                     f"{fmt_s(b['mean'])} ({fmt_s(b['min'])}-{fmt_s(b['max'])}) | {fmt_s(r.get('overhead_s'))} | "
                     f"{ld.get('requests', '-')} | {ld.get('ok', '-')} | **{ld.get('errors', '-')}** "
                     f"{ld.get('errors_by_status') or ''} | {v.get('restarted', '-')}/{v.get('instances', '-')} | "
                     f"{r.get('rc')} |")
        by = {r["serial"]: r for r in rolls if r.get("rc") == 0}
        oat = one_at_a_time(rec)
        if oat and not oat["measured"]:
            L += ["", f"The one-at-a-time run was stopped after {oat['batches_measured']} of {n} hosts (the time this "
                  f"shared machine was lent ran out). **Estimated** one-at-a-time wall time: the part outside the "
                  f"batches of the serial={oat['overhead_serial']} run ({fmt_s(oat['overhead_s'])}: the same plays) plus "
                  f"{n} x the mean one-host batch measured ({fmt_s(oat['batch_s'])}) = **{fmt_s(oat['s'])}**."]
        if oat:
            for serial in ("25%", "50%"):
                if serial in by:
                    ratio = by[serial]["wall_s"] / oat["s"]
                    goal = "; issue 32's goal: at most 0.33" if serial == "25%" else ""
                    est = "" if oat["measured"] else ", against the estimate above"
                    L.append("")
                    L.append(f"Ratio {serial} / one at a time: **{ratio:.2f}** ({fmt_s(by[serial]['wall_s'])} against "
                             f"{fmt_s(oat['s'])}{est}{goal}).")
        for r in rolls:
            v = r.get("verify", {})
            L.append("")
            L.append(f"After serial={r['serial']}: every GPU host's instance settings carry OLLAMA_NUM_PARALLEL="
                     f"{r.get('num_parallel')}: {v.get('env_ok')}; the gateway's max_conns {v.get('gateway_max_conns')}"
                     f", {v.get('drained')} drained, {v.get('down')} down; machine CPU busy mean "
                     f"{r.get('machine', {}).get('busy_mean')}; load latency p99 "
                     f"{fmt_s(r.get('load', {}).get('latency_p99_s'))}.")
        for r in rolls:
            if r.get("stopped"):
                L += ["", f"serial={r['serial']} was stopped by the benchmark's time limit on this shared machine "
                      f"after {len(r.get('batches', []))} finished batches ({r['stopped']}); its wall time is up to "
                      "the stop, and its load figures cover that time."]
        for sk in rec.get("skipped", []):
            L += ["", f"Not run: serial={sk['serial']}: {sk['reason']}"]
        L += ["", "Columns: per batch = each start of the play \"Roll the GPU hosts\" to the next play's start (a batch "
              "drains its hosts on the gateway, applies the host roles and role ollama, restarts and warms the "
              "instances, smokes them directly, returns them, then the exporter and guard roles); outside the "
              "batches = the rest of the wall time: the preflight play (facts and plans of every host), the capacity "
              "floor check, the gateway play that re-renders the gateway from the new plans, and Ansible's start; "
              "restarted = instances whose systemd unit entered active state during the run."]
        L += ["", "What bounds the ratio: the batches run in about (hosts / batch size) rounds, and the part outside "
              "the batches does not shrink with the batch size. With 8 hosts, 25% batches are 2 hosts, so 4 rounds "
              "against 8: the ratio cannot go below 4/8 = 0.5 even if a batch of 2 cost what one host costs, and the "
              "fixed part pulls it towards 1. On this machine the hosts also share 2 cores with the controller, so "
              "a batch of 2 costs more than one host (the per-batch column)."]
    mem = rec.get("memory_deployed") or {}
    if mem:
        ft = rec.get("fit") or fit(rec)
        idle = rec.get("idle_cpu") or {}
        L += ["", "## How many hosts fit on this machine", "",
              "| figure | value |", "|---|---|",
              f"| memory of a booted bare host (before lab.yml and site.yml), mean | "
              f"{stats([v['used_mib'] for h, v in (boot.get('memory') or {}).items() if h != gw])['mean']} MiB |",
              f"| memory of a deployed GPU host, idle (2 instances, exporter, guard, registry), mean (min-max) | "
              f"{ft['per_gpu_host_mib']['mean']} ({ft['per_gpu_host_mib']['min']}-{ft['per_gpu_host_mib']['max']}) "
              "MiB |",
              f"| memory of the deployed gateway | {ft.get('gateway_mib')} MiB |",
              f"| idle CPU of a deployed GPU host, mean (max) | "
              f"{(ft.get('idle_cores_per_gpu_host') or {}).get('mean')} ({(ft.get('idle_cores_per_gpu_host') or {}).get('max')})"
              f" cores over {idle.get('seconds')} s |",
              f"| machine memory available before boot / after site.yml, idle | "
              f"{boot.get('mem_available_before_mib')} / {rec.get('mem_available_deployed_mib')} MiB |",
              f"| least memory available during site.yml | {(site.get('machine') or {}).get('mem_available_min_mib')} "
              "MiB |",
              f"| GPU hosts that fit by memory (computed) | {ft.get('by_memory')} |",
              f"| GPU hosts that fit by idle CPU, half the cores (computed) | {ft.get('by_idle_cpu')} |"]
        L += ["", "Memory is what docker stats counts: the container's cgroup usage less its inactive file pages "
              "(rss, page cache of its tmpfs /run and /tmp and its files). The fits are computed from these figures, "
              f"not booted: {len(mem)} hosts were booted. By memory: the memory available before boot, less the "
              "controller's transient during site.yml and the gateway, over the largest GPU host. By CPU: the hosts "
              "whose idle work (guard rounds, exporter, emulator) takes at most half the cores, leaving the rest to "
              "Ansible. A deployment's time grows with the hosts: see the model below."]
    ex = rec.get("extrapolation") or extrapolate(rec)
    if ex.get("site"):
        es = ex["site"]
        L += ["", f"## Extrapolation to {ex['hosts']} GPU hosts (a model, not measured)", "",
              f"Model: a play on h hosts takes ceil(h / forks) rounds (forks = {ex['forks']}), each as long as the "
              f"measured play on {n} GPU hosts here; the controller needs its measured CPU per host-task "
              f"({es['controller_cpu_per_host_task_s']} CPU-s) for every host-task, over this machine's "
              f"{f.get('nproc')} cores at best. The rolling runs: the part outside the batches scaled the same way, "
              f"and {ex['hosts']} / batch size batches. Low: hosts with their own CPUs, a batch of k costs ceil(k / "
              f"forks) rounds of one host's measured roll (or the controller's CPU for it over the cores, if more); "
              "high: as on this machine, each extra host in a batch adds what it added here "
              f"({(ex.get('rolling') or {}).get('growth_per_host_in_batch_s')} s per host).", "",
              "| run | batches | time (low-high) |", "|---|---|---|",
              f"| site.yml | - | {fmt_s(es['s'])} (rounds model {fmt_s(es['forks_model_s'])}, controller CPU "
              f"{es['controller_cpu_s']} CPU-s: at least {fmt_s(es['controller_floor_s'])}) |"]
        if es.get("this_machine_s"):
            L.append(f"| site.yml with all {ex['hosts']} hosts on this 2-core machine (wall time x host-tasks there / "
                     f"here: {es['host_tasks']} / {site.get('host_tasks')}) | - | {fmt_s(es['this_machine_s'])} |")
        for serial, r in ((ex.get("rolling") or {}).get("runs") or {}).items():
            a_batch = f"{r['batch_hosts']} host{'s' if r['batch_hosts'] > 1 else ''} a batch"
            L.append(f"| rolling.yml serial={serial} ({a_batch}) | {r['batches']} | "
                     f"{fmt_s(r['low_s'])}-{fmt_s(r['high_s'])}"
                     + (f" (ratio to one at a time {r['ratio_low']}-{r['ratio_high']})" if "ratio_low" in r else "")
                     + " |")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-hosts", type=int, default=8, help="GPU hosts to boot (default 8), besides one gateway")
    p.add_argument("--out", default=None, help="report path without suffix: writes OUT.md and OUT.json "
                   "(default docs/benchmarks/<date>-deploy)")
    p.add_argument("--serials", default="1,25%,50%", help="herd_rolling_serial of each rolling run, in order; the "
                   "first should be 1 (the one-at-a-time reference)")
    p.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"the docker network's subnet (default {DEFAULT_SUBNET})")
    p.add_argument("--image", default=os.environ.get("HERD_BASE_IMAGE", IMAGE), help="the hosts' image")
    p.add_argument("--load-concurrency", type=int, default=4, help="clients of the load during each rolling run")
    p.add_argument("--load-requests", type=int, default=50000, help="bound on each load run's requests")
    p.add_argument("--load-max-seconds", type=int, default=1800, help="bound on each load run's seconds")
    p.add_argument("--idle-seconds", type=float, default=20.0, help="seconds of the idle CPU measurement")
    p.add_argument("--stop-by", default=None, help="HH:MM (UTC): start a rolling run only if it should end by then "
                   "(judged from the one-at-a-time run); everything is removed at the end anyway")
    p.add_argument("--work", default=None, help="scratch folder for the inventory and logs (default: a temp dir)")
    p.add_argument("--resume", default=None, help="a recorded JSON of a run left up with --keep: skip what it holds "
                   "(boot, stand-ins, site.yml and its measurements, rolling runs that passed) and do the rest")
    p.add_argument("--keep", action="store_true", help="leave the hosts up at the end (remove them with --down)")
    p.add_argument("--keep-logs", action="store_true", help="keep the work folder and record the logs' paths")
    p.add_argument("--dry-run", action="store_true", help="write the inventory and print the plan; no docker")
    p.add_argument("--render", default=None, help="write OUT.md again from this recorded JSON; no docker")
    p.add_argument("--down", action="store_true", help=f"remove every {PREFIX} host and network, then exit")
    p.add_argument("--command", default=None, help="command line recorded in the report")
    a = p.parse_args(argv)
    a.serials = [x.strip() for x in a.serials.split(",") if x.strip()]
    if a.stop_by:
        hh, mm = (int(x) for x in a.stop_by.split(":"))
        now = dt.datetime.now(dt.UTC)
        a.stop_by = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if a.gpu_hosts < 1:
        p.error("--gpu-hosts must be at least 1")
    return a


def write_report(rec: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rec, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(render(rec))


def main(argv=None) -> int:
    a = parse_args(argv)
    today = dt.date.today().isoformat()
    out = Path(a.out) if a.out else ROOT / "docs" / "benchmarks" / f"{today}-deploy"
    if a.render:
        rec = json.loads(Path(a.render).read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(render(rec))
        print(out.with_suffix(".md"))
        return 0
    if a.down:
        teardown()
        return 0
    own_work = a.work is None
    a.work = a.work or tempfile.mkdtemp(prefix=f"{PREFIX}-")
    command = a.command or "python3 benchmarks/deploy_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bench = Bench(a)
    if a.dry_run:
        print(f"# inventory: {bench.inv}/hosts.yml (group_vars -> inventories/lab/group_vars)")
        print((bench.inv / "hosts.yml").read_text())
        st = ansible_settings()
        print(f"# ansible: forks {st['forks']}, pipelining {st['pipelining']} ({st['source']})")
        for label, argv_ in bench.plan():
            print(f"# {label}\n{shlex.join(argv_)}")
        if own_work:
            shutil.rmtree(a.work, ignore_errors=True)
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    st = ansible_settings()
    rec = bench.rec
    rec.update({"version": 1, "command": command, "started": dt.datetime.now(dt.UTC).isoformat(
        timespec="seconds"), "complete": False, "errors": [], "facts": machine_facts(), "settings": {
        "gpu_hosts": a.gpu_hosts, "gpus_per_host": GPUS_PER_HOST, "instances_per_host": GPUS_PER_HOST,
        "model": MODEL, "image": a.image, "subnet": a.subnet, "network": NETWORK, "serials": a.serials,
        "forks": st["forks"], "pipelining": st["pipelining"], "settings_source": st["source"],
        "load_concurrency": a.load_concurrency, "load_requests": a.load_requests,
        "load_max_seconds": a.load_max_seconds}, "rolling": [], "skipped": []})
    t0 = time.monotonic()
    if a.resume:
        old = json.loads(Path(a.resume).read_text())
        rec.update({k: v for k, v in old.items() if k in (
            "boot", "standins", "site", "site_checks", "memory_deployed", "docker_stats_deployed",
            "mem_available_deployed_mib", "idle_cpu")})
        rec["rolling"] = [r for r in old.get("rolling", []) if r.get("rc") == 0]
        rec["resumed"] = {"from": old.get("started"), "errors_before": old.get("errors", [])}
        t0 -= old.get("took_s", 0)

    def save():
        rec["took_s"] = round(time.monotonic() - t0, 1)
        try:
            rec["fit"] = fit(rec)
            rec["extrapolation"] = extrapolate(rec)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            rec["errors"].append(f"analysis: {exc!r}")
        write_report(rec, out)

    try:
        if "boot" in rec:
            bench.inspect_ids()
        else:
            log(f"booting {len(bench.hosts)} hosts on {NETWORK} ({a.subnet})")
            rec["boot"] = bench.boot()
            save()
        if (rec.get("standins") or {}).get("rc") != 0:
            rec["standins"] = bench.playbook("standins", "playbooks/lab.yml")
            if bench.stopped is not None:
                raise bench.stopped
            if rec["standins"]["rc"] != 0:
                raise RuntimeError("playbooks/lab.yml failed")
        if (rec.get("site") or {}).get("rc") != 0:
            rec["site"] = bench.playbook("site", "site.yml")
            save()
            if bench.stopped is not None:
                raise bench.stopped
            if rec["site"]["rc"] != 0:
                raise RuntimeError("site.yml failed")
        if "idle_cpu" not in rec:
            rec["site_checks"] = c = bench.checks()
            if not c["version"] or c["generate_status"] != "200":
                raise RuntimeError(f"the gateway does not answer after site.yml: {c}")
            time.sleep(5)
            rec["memory_deployed"] = bench.memory()
            rec["docker_stats_deployed"] = bench.docker_stats()
            rec["mem_available_deployed_mib"] = round(meminfo()["MemAvailable"] / 2**20)
            rec["idle_cpu"] = bench.idle_cpu(a.idle_seconds)
            save()
        done = {r["serial"]: r for r in rec["rolling"]}
        value = 5 - rec["rolling"][-1]["num_parallel"] if rec["rolling"] else 3
        for i, serial in enumerate(a.serials):
            if serial in done:
                continue
            if a.stop_by and any(r["batch_hosts"] == 1 for r in rec["rolling"]):
                k = serial_batch(serial, a.gpu_hosts)
                est = expected_s(rec["rolling"], k, a.gpu_hosts)
                left = (a.stop_by - dt.datetime.now(dt.UTC)).total_seconds()
                if est > left:
                    rec["skipped"].append({"serial": serial, "reason": f"expected {est:.0f} s, {left:.0f} s left "
                                           f"before the machine had to be handed back ({a.stop_by:%H:%M} UTC)"})
                    log(rec["skipped"][-1]["reason"])
                    continue
            r = bench.rolling(serial, value, i)
            rec["rolling"].append(r)
            save()
            if bench.stopped is not None:
                raise bench.stopped
            if r["rc"] != 0:
                raise RuntimeError(f"rolling.yml serial={serial} failed")
            value = 5 - value
        rec["complete"] = True
    except BaseException as exc:  # noqa: BLE001 - record why, then tear down and re-raise
        rec["errors"].append(f"{type(exc).__name__}: {exc}"[:2000])
        raise
    finally:
        try:
            save()
        finally:
            if not a.keep:
                bench.teardown()
            if own_work and not a.keep_logs:
                shutil.rmtree(a.work, ignore_errors=True)
        log(f"report: {out}.md ({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
