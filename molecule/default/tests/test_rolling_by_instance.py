"""A single-host cluster never goes dark: rolling by instance under streaming load fails no request."""

import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import start_times  # noqa: E402
from herd_measure import measured as _measured  # noqa: E402

HOST = "herd-mol-aio"
PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
INSTANCES = 4



def test_rolling_by_instance_keeps_a_single_host_serving(host):
    before = start_times(host, INSTANCES)
    # docker cp cannot write under the host's /tmp (a tmpfs), hence /root.
    subprocess.run(["docker", "cp", f"{PROJECT}/tools/herd_load.py", f"{HOST}:/root/herd_load.py"], check=True)
    load = subprocess.Popen(
        ["docker", "exec", HOST, "python3", "/root/herd_load.py", "--url", "http://127.0.0.1", "--model",
         "herd-tiny:1b", "--concurrency", "4", "--requests", "50000", "--duration", "900", "--stream",
         "--prompt-mix", "short:16:24:1", "--progress", "0", "--quiet", "--json", "/root/by-instance.json"])
    try:
        time.sleep(3)
        run = subprocess.run(
            ["ansible-playbook", "-i", INVENTORY, f"{PROJECT}/playbooks/rolling.yml",
             "-e", "herd_rolling_by_instance=true", "-e", "ollama_num_parallel=3"],
            capture_output=True, text=True, timeout=1500)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    finally:
        # SIGTERM: the load tool issues nothing more, lets in-flight requests finish and writes its result.
        subprocess.run(["docker", "exec", HOST, "pkill", "-TERM", "-f", "herd_load.py"], check=False)
        load.wait(timeout=120)
    summary = json.loads(host.file("/root/by-instance.json").content_string)["summary"]
    _measured(f"rolling by instance under load: {summary['requests']} requests, {summary['ok']} ok, "
          f"{summary['errors']} failed {summary['errors_by_status']}, "
          f"{summary['stale_keepalive_retries']} resent on a closed keep-alive connection")
    assert summary["requests"] >= 100
    assert summary["errors"] == 0, summary["errors_by_status"]
    after = start_times(host, INSTANCES)
    for i in range(INSTANCES):
        assert 'OLLAMA_NUM_PARALLEL="3"' in host.file(f"/etc/herd/ollama/{i}.env").content_string
    # Instance 1 already ran with num_parallel 3 (test_default); the three others restarted, one at a time.
    restarted = [i for i in range(INSTANCES) if after[i] != before[i]]
    assert restarted == [0, 2, 3], (before, after)
    assert sorted(int(after[i]) for i in restarted) == [int(after[i]) for i in restarted]
    assert not host.run("ls /etc/herd/ollama/*.pending").stdout.strip()
    # Each instance's models were loaded twice: by the role's whole run, then in its own turn (a turn warms only the
    # instance it restarted, not the whole host again).
    for i in range(INSTANCES):
        loads = re.findall(rf"\(item=ollama@{i} herd-tiny:1b\)", run.stdout)
        assert len(loads) == 2, (i, len(loads))
