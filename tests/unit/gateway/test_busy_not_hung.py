"""Busy is not hung, end to end on loopback (issue 25): two emulator instances (2 slots each) behind the real nginx
serving the role's gateway, herd-guard's gateway duty running its own loop against them (its drains through the
real herd-gateway-drain and the gateway's admin location). Scaled down from the selfheal scenario: answers of
about 5 s (over 3 x the canary timeout of 1.5 s), 8 closed-loop streaming clients = every gateway slot of the
pool, 20 s; then one instance stopped (SIGSTOP) with every slot busy.

- busy: no drain, no failed round, no failed stream; a canary as the guard sent it before (1 token, no regard for
  the slots) times out on the same instance meanwhile (the control: the old guard took it for hung);
- hung while busy: drained (by /herd/pools, on every worker) within guard_stall_seconds + 5 s, back once it runs
  again.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import NGINX, ROOT, free_port, gateway_config, render

MODEL = "herd-tiny:1b"
CONF = "etc/nginx/conf.d/herd-gateway.conf.j2"
DRAIN = os.path.join(ROOT, "roles", "gateway", "files", "herd-gateway-drain")
STALL = 3.0
CANARY_TIMEOUT = 1.5
TOKENS = 100  # at 20 tokens/s a slot (HERD_EMU_TOKENS_PER_SECOND, 0.8 of it with both slots busy): 5-6 s


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


guard_mod = _load("herd_guard_busy", os.path.join(ROOT, "roles", "guard", "files", "herd_guard.py"))
lab = _load("herd_standins_lab_busy", os.path.join(ROOT, "tests", "unit", "standins", "standins_lab.py"))


def _stream(port, prompt, results):
    """One streaming generate through the gateway; records (ok, upstream, seconds)."""
    start = time.monotonic()
    body = json.dumps({"model": MODEL, "prompt": prompt, "stream": True, "options": {"num_predict": TOKENS}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            last = b""
            for line in resp:
                last = line
            ok = resp.status == 200 and json.loads(last).get("done") is True
            results.append((ok, resp.headers.get("X-Herd-Upstream"), time.monotonic() - start, start))
    except (OSError, ValueError) as exc:
        results.append((False, str(exc), time.monotonic() - start, start))


@pytest.fixture
def cluster(tmp_path, tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed here")
    models = tmp_path_factory.mktemp("models")
    lab.mkmodels.write_models(str(models), [MODEL])
    emus = [lab.Emu(tmp_path, {"OLLAMA_MODELS": str(models), "OLLAMA_NUM_PARALLEL": "2", "HERD_EMU_CPU_FACTOR": "1",
                               "HERD_EMU_TOKENS_PER_SECOND": "20", "OLLAMA_KEEP_ALIVE": "-1"}) for _ in range(2)]
    port = free_port()
    servers = [{"key": f"h:{i}", "host": "h", "name": f"ollama-{i}", "address": "127.0.0.1", "port": e.port,
                "endpoint": f"127.0.0.1:{e.port}", "num_parallel": 2, "max_conns": 4, "weight": 2, "backup": False,
                "models": [MODEL]} for i, e in enumerate(emus)]
    up = {"name": "herd_ollama", "zone_size": "256k", "keepalive": 32, "drain": [],
          "loopback_url": f"http://127.0.0.1:{port}"}
    record = {"upstream": up, "servers": servers}
    text = render(CONF, _gateway_upstream=up, _gateway_keys=[], gateway_http_port=port)
    upstream = render("etc/nginx/herd/gateway-upstream.conf.j2", _gateway_servers=servers, _gateway_upstream=up)
    main = gateway_config(tmp_path, text, {"/etc/nginx/herd/gateway-upstream.conf": upstream}, servers=record,
                          drained=[])
    user = "user root;\n" if os.geteuid() == 0 else ""  # the workers read drained.json in the test's private dir
    main.write_text(f"{user}worker_processes 2;\n" + main.read_text())
    (tmp_path / "logs").mkdir(exist_ok=True)
    nginx = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(main), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    state = tmp_path / "var/lib/herd/gateway"
    drain_cmd = tmp_path / "drain"
    drain_cmd.write_text(f"#!/bin/sh\nHERD_GATEWAY_STATE_DIR={state} HERD_NGINX_BIN=/bin/false "
                         f"exec {sys.executable} {DRAIN} \"$@\"\n")
    drain_cmd.chmod(0o755)
    config = {"host": "gw", "listen_address": "127.0.0.1", "port": 1, "interval": 0.5, "probe_timeout": 0.5,
              "canary_timeout": CANARY_TIMEOUT, "failures": 3, "restart_failures": 5, "passes": 2, "warm_timeout": 5,
              "restart_interval": 60, "stall_seconds": STALL, "restart_max_per_hour": 6, "peers": [], "local": None,
              "gateway": {"pools_url": f"http://127.0.0.1:{port}/herd/pools", "drain_command": str(drain_cmd),
                          "state_file": str(tmp_path / "guard-drained.json")}}
    guard = guard_mod.Guard(guard_mod.check_config(config))
    try:
        deadline = time.monotonic() + 10
        while guard_mod.fetch_view(config["gateway"]["pools_url"], 1) is None:
            assert time.monotonic() < deadline, (tmp_path / "error.log").read_text()
            time.sleep(0.1)
        for e in emus:  # load the model (a guard canary needs a loaded model, as on a warm instance)
            assert e.post_json("/api/generate", {"model": MODEL, "prompt": "x", "stream": False,
                                                 "options": {"num_predict": 1}})[0] == 200
        yield port, emus, guard
    finally:
        guard.stop.set()
        nginx.terminate()
        nginx.wait(10)
        for e in emus:
            os.kill(e.proc.pid, signal.SIGCONT)
            e.stop()


def test_busy_is_not_hung_and_hung_while_busy_is_drained(cluster):
    port, emus, guard = cluster
    stop_at = time.monotonic() + 20
    results = []

    def client(n):
        i = 0
        while time.monotonic() < stop_at:
            _stream(port, f"client {n} request {i}", results)
            i += 1

    clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    for t in clients:
        t.start()
    guard.start()
    time.sleep(4)
    view = guard.gateway_views(fresh=True)["gw"]
    assert all(inst["inflight"] == 4 for inst in view.values()), view
    # The control: the canary as the guard sent it before queues behind the clients and times out.
    control = guard_mod.canary(f"http://127.0.0.1:{emus[0].port}", MODEL, CANARY_TIMEOUT)
    time.sleep(max(0.0, stop_at - time.monotonic()))
    busy_failed = [r for r in results if not r[0]]
    counts = {k: dict(t.counts) for k, t in guard.targets.items()}
    failed_rounds = max(t.failed for t in guard.targets.values())
    drained_busy = set(guard.drained)
    # Hung while busy: the slots of h:0 are full with streams that stop producing.
    stopped = time.monotonic()
    os.kill(emus[0].proc.pid, signal.SIGSTOP)
    drained = None
    while time.monotonic() - stopped < STALL + 10:
        inst = guard_mod.fetch_view(guard.config["gateway"]["pools_url"], 1)["h:0"]
        if inst["drained"]:
            drained = time.monotonic() - stopped
            break
        time.sleep(0.1)
    os.kill(emus[0].proc.pid, signal.SIGCONT)
    back = None
    while time.monotonic() - stopped < 40:
        if not guard_mod.fetch_view(guard.config["gateway"]["pools_url"], 1)["h:0"]["drained"]:
            back = time.monotonic() - stopped
            break
        time.sleep(0.2)
    for t in clients:
        t.join(70)
    answers = [r[2] for r in results if r[0]]
    print(f"busy: {len(results)} streams, {len(busy_failed)} failed, answers {min(answers):.1f}-{max(answers):.1f} s, "
          f"canaries {counts}, control canary {control}; hung while busy: drained after {drained} s, back after {back} s")
    assert control[0] == "fail", control
    assert not busy_failed, busy_failed[:3]
    assert drained_busy == set() and failed_rounds == 0, (drained_busy, failed_rounds)
    assert all(c["fail"] == 0 for c in counts.values()), counts
    assert min(answers) > 3 * CANARY_TIMEOUT
    assert drained is not None and drained <= STALL + 5
    assert back is not None
