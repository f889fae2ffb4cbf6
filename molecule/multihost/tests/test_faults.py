"""Faults and security on the converged multihost lab (gateway + two GPU hosts, two instances each).

kill -9 of one instance under streaming load, a whole GPU host stopped and started under load, the instance
firewall (only the gateway reaches instance ports), systemd sandboxing exposure, and secrets kept out of logs.
Runs before test_multihost.py (alphabetical) and leaves the cluster as it found it. Every loop is bounded.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import playbook, wait  # noqa: E402
from herd_checks import sh as _sh
from herd_measure import measured as _measured  # noqa: E402

testinfra_hosts = ["herd-mh-gw"]

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
GW, GPU1, GPU2 = "herd-mh-gw", "herd-mh-gpu1", "herd-mh-gpu2"
MODEL = "herd-tiny:1b"
PORTS = (11434, 11435)
EXPOSURE_LIMIT = 4.0
KEY = "herd-fault-test-key-0123456789abcdef"


def _playbook(*args, timeout=600):
    return playbook(*args, timeout=timeout, env={**os.environ, "ANSIBLE_FORCE_COLOR": "0"})


def _ip(name):
    return _sh(GW, f"getent hosts {name}").stdout.split()[0]


def _wait(predicate, limit, step=0.5):
    return wait(predicate, limit, step)


def _start_load(name, duration, concurrency=6):
    subprocess.run(["docker", "cp", f"{PROJECT}/tools/herd_load.py", f"{GW}:/root/herd_load.py"], check=True)
    return subprocess.Popen(
        ["docker", "exec", GW, "python3", "/root/herd_load.py", "--url", "http://127.0.0.1", "--model", MODEL,
         "--concurrency", str(concurrency), "--requests", "5000", "--duration", str(duration), "--stream",
         "--prompt-mix", "long:16:200:1", "--progress", "0", "--quiet", "--timeout", "60",
         "--json", f"/root/{name}.json"],
    )


def _load_result(proc, name):
    proc.wait(timeout=180)
    return json.loads(_sh(GW, f"cat /root/{name}.json").stdout)


_PROMPTS = itertools.count()


def _spread(n=16):
    seen = set()
    # Prompts never sent before: conversation affinity keeps a repeated prompt on the instance that served it
    # last, so a prompt of an earlier spread would stay where it went while gpu2 was down.
    for _ in range(n):
        prompt = f"spread {next(_PROMPTS)}"
        out = _sh(GW, "curl -sS -o /dev/null -D - http://127.0.0.1/api/generate "
                      f"""-d '{{"model":"{MODEL}","prompt":"{prompt}","stream":false,"options":{{"num_predict":2}}}}'""").stdout
        seen |= {ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.lower().startswith("x-herd-upstream:")}
    return seen


def _all_instances():
    return {f"{_ip(h)}:{p}" for h in (GPU1, GPU2) for p in PORTS}


def _main_pid(host, unit):
    return _sh(host, f"systemctl show -p MainPID --value {unit}").stdout.strip()


def _answers(host, port):
    return _sh(host, f"curl -sf -m 2 http://127.0.0.1:{port}/api/version").returncode == 0


def test_kill_9_one_instance_under_streaming_load():
    victim = f"{_ip(GPU1)}:11434"
    load = _start_load("kill9", duration=30)
    try:
        time.sleep(8)
        old = _main_pid(GPU1, "ollama@0")
        assert old not in ("", "0")
        _sh(GPU1, f"kill -9 {old}")
        killed_at = time.monotonic()
        back = _wait(lambda: _main_pid(GPU1, "ollama@0") not in ("", "0", old) and _answers(GPU1, 11434), 30)
        restart_s = time.monotonic() - killed_at
    finally:
        result = _load_result(load, "kill9")
    s = result["summary"]
    broken = [r for r in result["samples"] if not r["ok"]]
    elsewhere = [r for r in broken if not _tried(r) <= {victim}]
    _measured(f"kill -9 ollama@0 on {GPU1}: restarted and answering after {restart_s:.1f} s; load {s['requests']} "
          f"requests, {s['ok']} ok, {len(broken)} broken (all on the killed instance: {not elsewhere}) "
          f"{s['errors_by_status']}")
    assert back is not None, "ollama@0 did not come back within 30 s"
    assert restart_s < 10
    assert s["requests"] >= 30 and s["ok"] >= s["requests"] - 6
    assert not elsewhere, elsewhere[:5]
    # The restarted instance serves again once nginx's fail_timeout (10 s) has passed.
    time.sleep(11)
    assert _spread() == _all_instances()


def _tried(record):
    """Addresses a request was sent to: nginx's $upstream_addr lists every attempt ("a:1, b:2 : c:3"). A retry for
    which the gateway's balancer found no other instance with a free slot leaves an empty entry: no address, so
    it is not an attempt on another host, also at the end of the list ("a:1 :")."""
    return set(re.findall(r"[^\s,]+:\d+", record["upstream"]))


def test_stopped_gpu_host_is_routed_around_and_rejoins():
    gpu2 = {f"{_ip(GPU2)}:{p}" for p in PORTS}
    try:
        load_t0 = time.monotonic()
        load = _start_load("hostdown", duration=40)
        try:
            time.sleep(6)
            stop_started = time.monotonic()
            subprocess.run(["docker", "stop", "-t", "10", GPU2], check=True, capture_output=True, timeout=60)
            stopped_at = time.monotonic()
        finally:
            result = _load_result(load, "hostdown")
        s = result["summary"]
        broken = [r for r in result["samples"] if not r["ok"]]
        # Only requests that had been sent to gpu2 may break (a retry may have gone to gpu2's other instance).
        elsewhere = [r for r in broken if not _tried(r) <= gpu2]
        _measured(f"docker stop {GPU2} under load (stop took {stopped_at - stop_started:.1f} s): {s['requests']} requests, "
              f"{s['ok']} ok, {len(broken)} broken {s['errors_by_status']}, started at "
              f"{[round(r['start'], 1) for r in broken]} s (stop at about {stop_started - load_t0:.1f} s), tried "
              f"{[r['upstream'] for r in broken]}; {len(elsewhere)} broken that had tried another host")
        assert sum(v["requests"] for k, v in result["by_upstream"].items() if k not in gpu2) > 0
        assert not elsewhere, elsewhere[:5]
        # With gpu2 down every request is served by gpu1.
        seen = _spread(8)
        assert seen and not seen & gpu2, seen
    finally:
        subprocess.run(["docker", "start", GPU2], check=True, capture_output=True, timeout=60)
    up = _wait(lambda: all(_answers(GPU2, p) for p in PORTS), 90, step=1)
    assert up is not None, _sh(GPU2, "systemctl --failed; journalctl -u 'ollama@*' -n 30").stdout
    _measured(f"{GPU2} instances answer {up:.1f} s after docker start")
    # The gateway resolved the names at its last reload: gpu2 must come back with the same address.
    assert _ip(GPU2) in {a.rsplit(":", 1)[0] for a in gpu2}, "gpu2 came back with another address"
    rejoined = _wait(lambda: _spread(8) >= gpu2, 40, step=2)
    assert rejoined is not None, "gpu2 did not rejoin the gateway"
    assert _spread() == _all_instances()


def test_only_the_gateway_reaches_instance_ports():
    for host in (GPU1, GPU2):
        table = _sh(host, "nft list table inet herd_instances")
        assert table.returncode == 0, table.stderr
        assert _sh(host, "systemctl is-enabled herd-instance-firewall.service").stdout.strip() == "enabled"
    for target, outsider in ((GPU1, GPU2), (GPU2, GPU1)):
        for port in PORTS:
            url = f"http://{target}:{port}/api/version"
            assert _sh(GW, f"curl -sf -m 3 {url}").returncode == 0, f"the gateway cannot reach {url}"
            assert _sh(target, f"curl -sf -m 3 http://127.0.0.1:{port}/api/version").returncode == 0
            refused = _sh(outsider, f"curl -sS -m 3 -o /dev/null {url}")
            # 7: the connection was refused (the firewall's TCP reset), not a name or routing problem.
            assert refused.returncode == 7, f"{outsider} (not a gateway) reached {url}: {refused.stderr}"
    _measured("instance firewall: gateway and loopback reach every instance port; the other GPU host is refused")


def test_systemd_exposure_of_instances():
    out = _sh(GPU1, "systemd-analyze security --no-pager ollama@0.service").stdout
    m = re.search(r"Overall exposure level for ollama@0\.service:\s*([0-9.]+)\s+(\S+)", out)
    assert m, out[-2000:]
    exposure = float(m.group(1))
    _measured(f"systemd-analyze security ollama@0.service: {exposure} {m.group(2)} (limit {EXPOSURE_LIMIT})")
    # The sandbox still lets the unit see the NVIDIA device nodes (CUDA): DevicePolicy=closed with the allowlist.
    props = _sh(GPU1, "systemctl show -p DevicePolicy -p DeviceAllow ollama@0.service").stdout
    assert "DevicePolicy=closed" in props and "char-nvidiactl rw" in props and "char-nvidia-uvm rw" in props
    assert exposure <= EXPOSURE_LIMIT, out[-3000:]


def test_api_key_is_never_printed_and_secret_files_are_private():
    try:
        rc, out = _playbook(f"{PROJECT}/site.yml", "--tags", "gateway", "-v", "--diff",
                            "-e", json.dumps({"gateway_api_keys": [{"name": "faults", "key": KEY}]}))
        assert rc == 0, out[-3000:]
        assert KEY not in out, "the API key appears in ansible-playbook -v --diff output"
        mode = _sh(GW, "stat -c '%a %U %G' /etc/nginx/herd/gateway-keys.json").stdout.split()
        assert mode == ["600", "root", "root"], mode
        gen = f"""-d '{{"model":"{MODEL}","prompt":"hi","stream":false,"options":{{"num_predict":2}}}}'"""
        code = "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1/api/generate "
        assert _sh(GW, code + gen).stdout == "401"
        assert _sh(GW, code + f"-H 'Authorization: Bearer {KEY}' " + gen).stdout == "200"
        assert _sh(GW, f"grep -rlF '{KEY}' /var/log/nginx/ || true").stdout.strip() == ""
    finally:
        rc, out = _playbook(f"{PROJECT}/site.yml", "--tags", "gateway")
        assert rc == 0, out[-3000:]
    assert _sh(GW, "test -e /etc/nginx/herd/gateway-keys.json").returncode != 0
    for host in (GPU1, GPU2):
        for f in ("0.env", "1.env", "store.env"):
            st = _sh(host, f"stat -c '%a %U %G' /etc/herd/ollama/{f}").stdout.split()
            assert st == ["640", "root", "ollama"], (host, f, st)
