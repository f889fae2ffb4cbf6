"""playbooks/rolling.yml re-applies every role of site.yml (firewall, exporter and guard changes do not lag behind a
rolling re-deploy), the GPU hosts' roles host by host."""

from __future__ import annotations

import pathlib

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]


def _roles(plays, gpu_hosts_only=False):
    found = set()
    for play in plays:
        if "hosts" not in play or (gpu_hosts_only and "ollama_hosts" not in play["hosts"]):
            continue
        found |= {r["role"] if isinstance(r, dict) else r for r in play.get("roles", [])}
        tasks = list(play.get("tasks", []))
        while tasks:
            task = tasks.pop()
            tasks += task.get("block", [])
            included = task.get("ansible.builtin.include_tasks")
            if included:  # a task file beside the playbook (tasks/roll.yml)
                tasks += yaml.safe_load((REPO / "playbooks" / included).read_text()) or []
            include = task.get("ansible.builtin.include_role")
            if include and include.get("tasks_from") in (None, "main"):
                names = task.get("loop") if "{{" in include["name"] else [include["name"]]
                found |= set(names)
    return found


def test_rolling_applies_every_role_of_site():
    site = yaml.safe_load((REPO / "site.yml").read_text())
    rolling = yaml.safe_load((REPO / "playbooks" / "rolling.yml").read_text())
    assert _roles(rolling) == _roles(site)


def test_rolling_applies_the_gpu_hosts_roles_in_its_serial_play():
    site = yaml.safe_load((REPO / "site.yml").read_text())
    rolling = yaml.safe_load((REPO / "playbooks" / "rolling.yml").read_text())
    serial = [p for p in rolling if "serial" in p]
    assert len(serial) == 1
    assert _roles(serial, gpu_hosts_only=True) == _roles(site, gpu_hosts_only=True)
