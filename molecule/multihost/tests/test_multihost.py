"""Central gateway over two GPU hosts: spread, a batch over the capacity floor refused before any change, a
failing host that stops the rollout while the rest keeps serving, and the fixed rerun (what an operator does
next): a rolling re-deploy under streaming load with no failed request that returns the drained host.

The tests run in this order and each starts from the state the one before left."""

import itertools
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import playbook  # noqa: E402
from herd_measure import measured as _measured  # noqa: E402

testinfra_hosts = ["herd-mh-gw"]

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
GW = "herd-mh-gw"
MODEL = "herd-tiny:1b"
INSTANCES = {f"{h}:{p}" for h in ("herd-mh-gpu1", "herd-mh-gpu2") for p in (11434, 11435)}


def _playbook(*args, timeout=900):
    return playbook(*args, timeout=timeout)


_PROMPTS = itertools.count()


def _upstreams(host, n):
    seen = []
    # Prompts never sent before: conversation affinity keeps a repeated prompt on the instance that served it last.
    for _ in range(n):
        prompt = f"upstreams {next(_PROMPTS)}"
        out = host.check_output(
            "curl -sS -o /dev/null -D - http://127.0.0.1/api/generate "
            f"""-d '{{"model":"{MODEL}","prompt":"{prompt}","stream":false,"options":{{"num_predict":4}}}}'"""
        )
        assert out.splitlines()[0].split()[1] == "200", out
        seen += [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.lower().startswith("x-herd-upstream:")]
    return seen


def _resolve(host, addr):
    name, port = addr.rsplit(":", 1)
    return host.check_output(f"getent hosts {name}").split()[0] + ":" + port


def test_gateway_spreads_over_every_instance_of_both_hosts(host):
    expected = {_resolve(host, a) for a in INSTANCES}
    assert set(_upstreams(host, 12)) == expected


def test_a_batch_over_the_capacity_floor_is_refused_before_any_change(host):
    # Both GPU hosts in one batch would take every slot of herd-tiny:1b out at once.
    before = host.file("/etc/nginx/herd/gateway-upstream.conf").sha256sum
    rc, out = _playbook(f"{PROJECT}/playbooks/rolling.yml", "-e", "herd_rolling_serial=2")
    assert rc != 0
    assert re.search(r"herd_rolling_serial=2: batch 1 \(herd-mh-gpu1, herd-mh-gpu2\) would take (\d+) of the \1 slots "
                     r"of model herd-tiny:1b out at once \(100%\), above herd_rolling_max_pool_share=50%", out), out[-4000:]
    assert "Roll the GPU hosts" not in out  # refused before the first host was touched
    assert json.loads(host.file("/var/lib/herd/gateway/drained.json").content_string) == []
    assert host.file("/etc/nginx/herd/gateway-upstream.conf").sha256sum == before
    assert len(set(_upstreams(host, 8))) == len(INSTANCES)


def test_failing_host_stops_the_rollout_and_the_rest_serves(host):
    rc, out = _playbook(f"{PROJECT}/playbooks/rolling.yml", "-e", '{"ollama_models": [{"name": "herd-missing:1b"}]}')
    assert rc != 0
    assert "The rollout stopped at herd-mh-gpu1" in out, out[-4000:]
    # gpu2 was never touched and serves every request; gpu1 is drained on the gateway.
    seen = set(_upstreams(host, 8))
    gpu2 = {_resolve(host, a) for a in INSTANCES if a.startswith("herd-mh-gpu2")}
    assert seen == gpu2
    drained = json.loads(host.file("/var/lib/herd/gateway/drained.json").content_string)
    assert drained and all(d.split(":")[0] == "herd-mh-gpu1" for d in drained), drained
    # The fixed rerun under load (the next test) returns it.


def test_rolling_redeploy_after_the_failure_under_streaming_load_fails_no_request(host):
    subprocess.run(["docker", "cp", f"{PROJECT}/tools/herd_load.py", f"{GW}:/root/herd_load.py"], check=True)
    load = subprocess.Popen(
        ["docker", "exec", GW, "python3", "/root/herd_load.py", "--url", "http://127.0.0.1", "--model", MODEL,
         "--concurrency", "4", "--requests", "3000", "--duration", "150", "--stream", "--prompt-mix",
         "short:16:24:1", "--progress", "0", "--quiet", "--json", "/root/rolling-load.json"],
    )
    try:
        time.sleep(3)
        rc, out = _playbook(f"{PROJECT}/playbooks/rolling.yml", "-e", "ollama_num_parallel=3")
        assert rc == 0, out[-4000:]
    finally:
        # The load is bounded (--duration 150 s) and writes its result when it ends.
        load.wait(timeout=400)
    result = json.loads(host.file("/root/rolling-load.json").content_string)["summary"]
    _measured(f"rolling re-deploy under load: {result['requests']} requests, {result['ok']} ok, "
          f"{result['errors']} failed {result['errors_by_status']}")
    assert result["requests"] >= 50
    assert result["errors"] == 0, result["errors_by_status"]
    for h in ("herd-mh-gpu1", "herd-mh-gpu2"):
        env = subprocess.run(["docker", "exec", h, "cat", "/etc/herd/ollama/0.env"], capture_output=True, text=True)
        assert 'OLLAMA_NUM_PARALLEL="3"' in env.stdout
    # docker cp cannot write under the hosts' /tmp (a tmpfs), hence /root above.
    # The gateway's servers record (read by nginx at every reload): slots follow num_parallel, nothing drained.
    servers = json.loads(host.file("/var/lib/herd/gateway/servers.json").content_string)["servers"]
    assert len(servers) == 4
    assert all(s["max_conns"] == 3 for s in servers), servers
    assert json.loads(host.file("/var/lib/herd/gateway/drained.json").content_string) == []
    # herd-mh-gpu1, drained by the stopped rollout before it, serves again beside herd-mh-gpu2.
    assert set(_upstreams(host, 12)) == {_resolve(host, a) for a in INSTANCES}
