"""Each role owns its whole life: every role that installs anything declares a `teardown` entry point
(meta/argument_specs.yml and tasks/teardown.yml), and playbooks/teardown.yml does nothing but run each of them.
What a teardown leaves on a real host is checked by the trixie_aio and container scenarios (test_zz_teardown.py)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
ROLES = sorted(p for p in (REPO / "roles").iterdir() if (p / "tasks" / "main.yml").exists())
PLAYBOOK = yaml.safe_load((REPO / "playbooks" / "teardown.yml").read_text())


def _installs(role: pathlib.Path) -> bool:
    """A role with install/apply/configure tasks, or one that installs a herd service through role herd_service."""
    main = role / "tasks" / "main.yml"
    return (any((role / "tasks" / name).exists() for name in ("install.yml", "apply.yml", "configure.yml"))
            or (main.exists() and "name: herd_service\n" in main.read_text()))


def _included() -> list[tuple[str, str]]:
    return [(task["ansible.builtin.include_role"]["name"], task["ansible.builtin.include_role"].get("tasks_from"))
            for play in PLAYBOOK for task in play.get("tasks", [])]


@pytest.mark.parametrize("role", [r for r in ROLES if _installs(r)], ids=lambda r: r.name)
def test_role_declares_a_teardown_entry_point(role):
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    assert "teardown" in specs, f"role {role.name} installs things but its argument_specs has no teardown entry point"
    assert specs["teardown"].get("short_description")
    assert (role / "tasks" / "teardown.yml").exists(), f"role {role.name} has no tasks/teardown.yml"


def test_teardown_playbook_only_runs_the_roles_teardowns():
    for play in PLAYBOOK:
        assert set(play) <= {"name", "hosts", "gather_facts", "gather_subset", "vars", "tasks"}, play["name"]
        for task in play["tasks"]:
            assert set(task) <= {"name", "ansible.builtin.include_role", "when"}, task["name"]
    included = _included()
    assert all(entry == "teardown" for _, entry in included), included
    assert sorted(name for name, _ in included) == sorted(r.name for r in ROLES if _installs(r))


def test_teardown_runs_in_the_reverse_order_of_site():
    """Guard and exporter go before what they watch; nginx is reloaded after the gateway's files are gone."""
    names = [name for name, _ in _included()]
    assert names.index("guard") < names.index("ollama")
    assert names.index("exporter") < names.index("ollama")
    assert names.index("gateway") < names.index("nginx")
