"""Shared by the molecule scenarios' tests: run playbooks/teardown.yml and list what herd left on a host.

`leftovers(host)` asks the real host (testinfra) for every trace of herd: systemd units, files and directories
named after herd or Ollama, nginx configuration that mentions herd, nftables tables, Docker containers, the
accounts herd created and the lab stand-ins. A scenario asserts that it is non-empty before the teardown (the
scan sees the deployment) and empty after it.
"""

import os
import re
import subprocess
import time

# Where herd writes (site.yml, lab.yml); /var/lib/docker is the nested engine's storage (image layers), and /var/log
# keeps the gateway's access log on purpose, like model data.
SCAN_ROOTS = "/etc /opt /srv /usr/bin /usr/local /usr/share /var/lib"
SCAN = (
    f"find {SCAN_ROOTS} -xdev -path /var/lib/docker -prune -o "
    r"\( -iname '*herd*' -o -iname 'ollama*' \) -print 2>/dev/null"
)


def _lines(host, command):
    return [line for line in host.run(command).stdout.splitlines() if line.strip()]


def leftovers(host, fixtures=()):
    """Every trace of herd on the host, one 'kind: what' string each; [] when nothing is left. `fixtures`: regular
    expressions of traces that the scenario's own prepare put there (not herd's playbooks), left out."""
    found = []
    found += [f"unit: {u}" for u in _lines(host, "systemctl list-units --all --plain --no-legend 'ollama*' 'herd-*'")]
    found += [f"unit file: {u}" for u in _lines(host, "systemctl list-unit-files --no-legend 'ollama*' 'herd-*'")]
    found += [f"file: {p}" for p in _lines(host, SCAN)]
    found += [f"nginx include: {p}" for p in _lines(host, "grep -rlis herd /etc/nginx")]
    found += [f"nftables table: {t}" for t in _lines(host, "nft list tables 2>/dev/null | grep -i herd")]
    found += [f"container: {c}" for c in _lines(
        host, "command -v docker >/dev/null && docker ps -a --format '{{.Names}} {{.Labels}}' | grep -i -e herd -e ollama")]
    found += [f"account: {a}" for a in _lines(host, "getent passwd ollama; getent group ollama")]
    found += [f"lab stand-in: {p}" for p in _lines(host, "grep -lsF 'herd LAB STAND-IN' /usr/bin/nvidia-smi")]
    return [line for line in found if not any(re.search(f, line) for f in fixtures)]


def run_teardown(timeout=300):
    """Run the checkout's playbooks/teardown.yml (models too) against the scenario; return (seconds, recap)."""
    project = os.environ["MOLECULE_PROJECT_DIRECTORY"]
    started = time.monotonic()
    run = subprocess.run(
        ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], f"{project}/playbooks/teardown.yml",
         "-e", "herd_teardown_models=true"],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "ANSIBLE_PIPELINING": "1"},  # as herd's ansible.cfg: no copy of each module into the host
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return time.monotonic() - started, run.stdout[run.stdout.rindex("PLAY RECAP"):]
