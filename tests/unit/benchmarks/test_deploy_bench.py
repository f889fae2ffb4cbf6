"""The deployment benchmark cannot rot: it boots 9 hosts and runs for most of an hour, too much for make test, so
its dry run (the inventory it writes and the plan of commands, no docker) and its report (rendered from a recorded
run) run here, with the analysis it reports: per-host times from the callback's record, the serial batches, the
fit and the extrapolation to 64 hosts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "deploy_bench.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import deploy_bench as db  # noqa: E402


def run(*args, timeout=60):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_dry_run_writes_the_inventory_and_plans_every_step_without_docker(tmp_path):
    out = run("--dry-run", "--gpu-hosts", "3", "--work", str(tmp_path))
    inv = tmp_path / "inventory"
    hosts = yaml.safe_load((inv / "hosts.yml").read_text())
    lab = hosts["all"]["children"]["lab"]
    assert list(lab["children"]["gateways"]["hosts"]) == ["herd-scale-gw"]
    gpus = lab["children"]["ollama_hosts"]
    assert list(gpus["hosts"]) == ["herd-scale-gpu1", "herd-scale-gpu2", "herd-scale-gpu3"]
    assert gpus["vars"]["ollama_gpu_groups"] == [[0], [1]]
    spec = json.loads(Path(gpus["vars"]["lab_standins_gpu_spec_file"]).read_text())
    assert len(spec["gpus"]) == 2 and spec["state"] == "ok"
    # The lab's group_vars, linked as the molecule scenarios link them.
    assert (inv / "group_vars").resolve() == (ROOT / "inventories" / "lab" / "group_vars").resolve()
    # Its own network, never scripts/lab.sh's; every host named herd-scale-* and labelled.
    assert "--subnet 172.29.220.0/24 --label herd.scale=1 herd-scale" in out
    assert "172.29.213." not in out
    boots = [line for line in out.splitlines() if line.startswith("docker run")]
    assert len(boots) == 4 and all("--label herd.scale=1" in b and "--cgroupns=host" in b for b in boots)
    assert all("--name herd-scale-" in b for b in boots)
    # site.yml after the stand-ins; the rolling runs in order, each changing num_parallel from the run before.
    plays = [line for line in out.splitlines() if "ansible-playbook" in line]
    assert plays[0].endswith("playbooks/lab.yml") and plays[1].endswith("site.yml")
    assert [p.split("herd_rolling_serial=")[1].split()[0] for p in plays[2:]] == ["1", "25%", "50%"]
    assert [p.rsplit("ollama_num_parallel=", 1)[1] for p in plays[2:]] == ["3", "2", "3"]
    # Bounded load against the benchmark's own gateway only.
    loads = [line for line in out.splitlines() if "herd_load.py" in line]
    assert loads and all("--url http://127.0.0.1 " in x and "--requests" in x and "--duration" in x for x in loads)
    assert "# ansible: forks 20, pipelining True (ansible.cfg)" in out


def test_the_inventory_gives_the_hosts_the_lab_settings_and_its_own_network(tmp_path):
    inv = db.write_inventory(tmp_path, 2, "172.29.220.0/24")
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "ansible-inventory"), "-i", str(inv), "--list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
                                                                            "PATH": "/usr/bin:/bin"})
    if proc.returncode != 0 and not (ROOT / ".venv" / "bin" / "ansible-inventory").exists():
        pytest.skip("no .venv: run make bootstrap")
    assert proc.returncode == 0, proc.stderr
    hv = json.loads(proc.stdout)["_meta"]["hostvars"]
    gpu = hv["herd-scale-gpu2"]
    # from inventories/lab/group_vars/all.yml
    assert gpu["ollama_models"][0]["name"] == db.MODEL and gpu["ollama_bind_address"] == "0.0.0.0"
    # group_vars/all.yml (a group_vars file) wins over the hosts file's group vars: the lab's gateway_allow stays;
    # the benchmark reaches the gateway on its loopback only (docker exec), so it does not need its own network there.
    assert hv["herd-scale-gw"]["gateway_allow"][0] == "127.0.0.1/32"
    assert gpu["ollama_gpu_groups"] == [[0], [1]]


def test_ansible_settings_and_serial_batches_follow_ansible():
    st = db.ansible_settings()
    assert st["forks"] == 20 and st["pipelining"] is True
    assert db.ansible_settings(env={"ANSIBLE_FORKS": "5", "ANSIBLE_PIPELINING": "false"})["forks"] == 5
    # serial: a percentage rounds down, never below one host
    assert [db.serial_batch(s, 8) for s in ("1", "25%", "50%", "10%")] == [1, 2, 4, 1]
    assert db.serial_batch("25%", 64) == 16 and db.serial_batch("3", 2) == 2
    assert [db.waves(h, 20) for h in (1, 20, 21, 65)] == [1, 1, 2, 4]
    assert [db.to_mib(x) for x in ("123.4MiB", "1.5GiB", "512KiB", "--")] == [123.4, 1536.0, 0.5, None]


def timing(t0, plays, gw="herd-scale-gw"):
    """A callback record: plays = [(name, seconds, {host: task seconds})], tasks one after another on each host."""
    doc = {"started": t0, "plays": [], "tasks": [], "recap": {}}
    t = t0 + 2.0
    for i, (name, secs, hosts) in enumerate(plays):
        doc["plays"].append({"name": name, "start": t})
        for host, task_s in hosts.items():
            start = t
            while start + task_s <= t + secs:
                doc["tasks"].append({"host": host, "task": "x", "action": "a", "play": i, "start": start,
                                     "end": start + task_s * 0.9, "status": "ok"})
                start += task_s
        t += secs
    doc["ended"] = t
    return doc


GPUS = [f"herd-scale-gpu{i}" for i in range(1, 9)]
GW = "herd-scale-gw"


def test_callback_record_gives_plays_batches_and_host_times():
    doc = timing(1000.0, [("Validate", 10, {h: 1 for h in [GW, *GPUS]}), ("Roll the GPU hosts", 30, {GPUS[0]: 3}),
                          ("Roll the GPU hosts", 30, {GPUS[1]: 3})])
    # overlapping intervals on one host count once
    doc["tasks"].append({"host": GPUS[0], "task": "y", "action": "a", "play": 1, "start": 1012.0, "end": 1013.0,
                         "status": "changed"})
    doc["tasks"].append({"host": GPUS[0], "task": "z", "action": "a", "play": 1, "start": 1013.0, "end": None,
                         "status": None})
    spans = db.play_spans(doc)
    assert [(p["name"], p["s"], len(p["hosts"])) for p in spans] == [
        ("Validate", 10, 9), ("Roll the GPU hosts", 30, 1), ("Roll the GPU hosts", 30, 1)]
    assert spans[0]["start_s"] == 2.0
    ht = db.host_times(doc)
    assert ht[GW] == {"busy_s": 9.0, "tasks": 10, "skipped": 0, "changed": 0}
    assert ht[GPUS[0]]["busy_s"] == pytest.approx(9.0 + 27.0) and ht[GPUS[0]]["changed"] == 1
    assert db.union_s([(0, 2), (1, 3), (5, 6)]) == 4


def recorded(n=8):
    """A recorded run of the benchmark, as main() saves it, with round figures."""
    site_doc = timing(0.0, [("Validate settings and plan every host before any change", 20, {h: 2 for h in [GW, *GPUS]}),
                            ("Deploy Ollama instances", 200, {h: 2 for h in GPUS}),
                            ("Deploy the gateways", 60, {GW: 2})])
    site = {"playbook": "site.yml", "rc": 0, "wall_s": 285.0, "controller_cpu_s": 300.0, "containers_cpu_s": 150.0,
            "docker_daemons_cpu_s": 40.0, "machine": {"busy_mean": 0.95, "busy_p50": 1.0, "seconds_over_90pct": 250,
                                                     "seconds": 285, "mem_available_min_mib": 17000},
            "plays": db.play_spans(site_doc), "hosts": db.host_times(site_doc), "recap": {}}
    site["host_tasks"] = sum(h["tasks"] for h in site["hosts"].values())

    def roll(serial, k, batch_s, value):
        plays = [("Validate settings and plan every host before any change", 20, {h: 2 for h in [GW, *GPUS]}),
                 ("Check the rollout's batches against the capacity floor, before any change", 2, {GPUS[0]: 1})]
        plays += [("Roll the GPU hosts", batch_s, {h: 3 for h in GPUS[i:i + k]}) for i in range(0, n, k)]
        plays += [("Re-render every gateway from the new plans (max_conns and weights follow num_parallel)", 40,
                   {GW: 2})]
        doc = timing(0.0, plays)
        spans = db.play_spans(doc)
        batches = [{"s": p["s"], "hosts": p["hosts"]} for p in spans if p["name"] == db.ROLL_PLAY]
        wall = doc["ended"] + 3
        return {"playbook": "playbooks/rolling.yml", "rc": 0, "wall_s": wall, "controller_cpu_s": 5.0 * n,
                "serial": serial, "batch_hosts": k, "num_parallel": value, "plays": spans, "batches": batches,
                "overhead_s": round(wall - sum(b["s"] for b in batches), 1), "machine": {"busy_mean": 0.9},
                "load": {"requests": 4000, "ok": 4000, "errors": 0, "errors_by_status": {}, "latency_p99_s": 0.5},
                "verify": {"restarted": 2 * n, "instances": 2 * n, "env_ok": True, "gateway_max_conns": [value],
                           "drained": 0, "down": 0}}

    mem = {GW: {"used_mib": 120.0}} | {h: {"used_mib": 200.0 + i} for i, h in enumerate(GPUS)}
    return {"version": 1, "command": "python3 benchmarks/deploy_bench.py --gpu-hosts 8", "started": "2026-12-03T11:05:00",
            "complete": True, "errors": [], "took_s": 2400.0,
            "facts": {"nproc": 2, "cpu": "AMD EPYC", "memory_gib": 23.5, "os": "Debian GNU/Linux 12 (bookworm)",
                      "docker": "20.10", "ansible_core": "ansible-playbook [core 2.19.14]", "herd_commit": "0755807",
                      "herd_dirty": True},
            "settings": {"gpu_hosts": n, "forks": 20, "pipelining": True, "settings_source": "ansible.cfg",
                         "image": "herd-base:bookworm", "subnet": "172.29.220.0/24", "load_concurrency": 4},
            "boot": {"s": 12.0, "hosts": n + 1, "mem_available_before_mib": 22000, "memory": {h: {"used_mib": 30.0}
                                                                                              for h in GPUS}},
            "standins": {"wall_s": 60.0}, "site": site,
            "site_checks": {"version": '{"version":"0.34.2-herd-emulator"}', "generate_status": "200",
                            "generate_done": True, "instances": 2 * n, "expected_instances": 2 * n, "down": 0,
                            "drained": 0, "max_conns": [2]},
            "memory_deployed": mem, "mem_available_deployed_mib": 19000,
            "idle_cpu": {"seconds": 20, "cores_per_host": {GW: 0.01} | {h: 0.02 for h in GPUS}},
            "rolling": [roll("1", 1, 60, 3), roll("25%", 2, 80, 2), roll("50%", 4, 120, 3)], "skipped": []}


def test_fit_and_extrapolation_from_a_recorded_run():
    rec = recorded()
    ft = db.fit(rec)
    # (22000 available - (19000 - 17000) transient - 120 gateway) // 207 (largest GPU host)
    assert ft["by_memory"] == (22000 - 2000 - 120) // 207
    assert ft["by_idle_cpu"] == 50 and ft["hosts"] == min(ft["by_memory"], 50)
    ex = db.extrapolate(rec)
    # site.yml: plays on 9 and 8 hosts take 4 rounds of 20 forks at 64 hosts, the gateway's play one
    assert ex["site"]["forks_model_s"] == round(2 + 20 * 4 + 200 * 4 + 60 + 3)
    roll = ex["rolling"]
    assert roll["per_batch_measured"] == {"1": 60.0, "2": 80.0, "4": 120.0}
    assert roll["growth_per_host_in_batch_s"] == 20.0
    runs = roll["runs"]
    assert runs["1"]["batches"] == 64 and runs["25%"]["batches"] == 4 and runs["25%"]["batch_hosts"] == 16
    # low: a batch of 16 costs one host's roll; high: 60 + 15 x 20 s
    over = roll["overhead_s"]
    assert runs["25%"]["low_s"] == round(over + 4 * 60) and runs["25%"]["high_s"] == round(over + 4 * 360)
    assert runs["25%"]["ratio_low"] < 0.33
    # the stop-by judgement: 4 batches of 2 hosts, each 60 + 20 s, and the overhead
    assert db.expected_s(rec["rolling"][:2], 2, 8) == pytest.approx(rec["rolling"][0]["overhead_s"] + 4 * 80 + 60,
                                                                    abs=1)


def test_report_renders_from_the_recorded_json(tmp_path):
    rec = recorded()
    src = tmp_path / "rec.json"
    src.write_text(json.dumps(rec))
    run("--render", str(src), "--out", str(tmp_path / "report"))
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# herd deployment benchmark, lab, 2026-12-03")
    assert "python3 benchmarks/deploy_bench.py --gpu-hosts 8" in md and "`0755807` (with uncommitted changes)" in md
    assert "forks 20, pipelining on" in md
    assert "| `ansible-playbook site.yml`, wall time | **285 s** (exit 0) |" in md
    assert "| 25% | 2 | 4 |" in md and "Ratio 25% / one at a time: **" in md
    assert "## Extrapolation to 64 GPU hosts (a model, not measured)" in md
    assert "| rolling.yml serial=25% (16 hosts a batch) | 4 |" in md
    assert "did not complete" not in md
    rec["complete"], rec["errors"] = False, ["RuntimeError: site.yml failed"]
    src.write_text(json.dumps(rec))
    run("--render", str(src), "--out", str(tmp_path / "report"))
    assert "**This run did not complete.** RuntimeError: site.yml failed" in (tmp_path / "report.md").read_text()
