"""Issue 27: a link planted in an instance's models folder (what a compromised Ollama, running as the ollama
account that owns the folder, could do) is never followed by a deployment run as root; and each instance executes
its own link to the release it was started with.

The deployment run that meets the link also changes one instance (instance 1 to num_parallel 3): it restarts, and so
may instance 0, whose models the planted link broke; instances 2 and 3 do not. test_rolling_by_instance, later,
counts on instance 1 already being at num_parallel 3."""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import env_file, start_times  # noqa: E402

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
MODELS = "/var/lib/herd/instances/0/models"
BAIT = "/srv/herd-bait"
RELEASE = "/opt/ollama/0.34.2-herd-emulator"
INSTANCES = 4



def _bait_state(host):
    return host.check_output(f"stat -c '%n %u %g %a %s' {BAIT} {BAIT}/* && sha256sum {BAIT}/* && ls -A {BAIT}")


def test_a_link_planted_in_an_instance_models_folder_is_replaced_never_followed(host):
    # A root-owned folder outside herd's paths, mode 0700, with a file; instance 0's manifests/ becomes a link to it,
    # made by the ollama account as a compromised instance would.
    host.check_output(
        f"set -e; rm -rf {BAIT}; mkdir -p {BAIT}; echo 'root only' > {BAIT}/secret; chmod 0600 {BAIT}/secret; "
        f"chown -R root:root {BAIT}; chmod 0700 {BAIT}; "
        f"mv {MODELS}/manifests {MODELS}/manifests.aside; "
        f"runuser -u ollama -- ln -s {BAIT} {MODELS}/manifests"
    )
    before = _bait_state(host)
    started = start_times(host, INSTANCES)
    try:
        # The play that deploys the instances (--tags ollama: preflight, firewall and role ollama, whose model sync
        # meets the link) is the run as root; it changes instance 1 only.
        run = subprocess.run(["ansible-playbook", "-i", INVENTORY, f"{PROJECT}/site.yml", "--tags", "ollama",
                              "-e", json.dumps({"ollama_instance_overrides": {"1": {"num_parallel": 3}}})],
                             capture_output=True, text=True, timeout=1200)
        out = run.stdout + run.stderr
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        # the run says what it found and what it did
        assert f"{MODELS}/manifests was a symbolic link" in out, out[-4000:]
        assert "never followed" in out
        # the bait is untouched: owner, group, mode, size, contents and entries
        assert _bait_state(host) == before
        manifests = host.file(f"{MODELS}/manifests")
        assert manifests.is_directory and not manifests.is_symlink
        assert (manifests.user, manifests.group) == ("ollama", "ollama")
        assert host.file(f"{MODELS}/manifests/registry.ollama.ai/library/herd-tiny/1b").is_file
        # changing one instance restarts that instance; instance 0, whose models the planted link broke for a while,
        # may have restarted too (seen once); instances 2 and 3 keep running
        after = start_times(host, INSTANCES)
        assert after[1] != started[1], "ollama@1 should have restarted"
        assert after[2:] == started[2:], (started, after)
        assert env_file(host, 1)["OLLAMA_NUM_PARALLEL"] == "3"
    finally:
        host.run(f"test -L {MODELS}/manifests && rm {MODELS}/manifests && mv {MODELS}/manifests.aside {MODELS}/manifests")
        host.run(f"rm -rf {MODELS}/manifests.aside {BAIT}")


def test_each_instance_executes_its_own_link_to_the_release(host):
    for i in range(INSTANCES):
        link = host.file(f"/etc/herd/ollama/{i}.ollama")
        assert link.is_symlink and link.linked_to == f"{RELEASE}/bin/ollama"
        # the lab's bin/ollama is a Python script (exe is python3), so its command line shows the link it ran
        pid = host.check_output(f"systemctl show -p MainPID --value ollama@{i}")
        cmdline = host.check_output(f"tr '\\0' ' ' < /proc/{pid}/cmdline")
        assert f"/etc/herd/ollama/{i}.ollama serve" in cmdline, (i, cmdline)
    unit = host.file("/etc/systemd/system/ollama@.service").content_string
    assert "ExecStart=/etc/herd/ollama/%i.ollama serve" in unit
    assert host.file("/etc/herd/ollama/created").contains("^/opt/ollama$")
