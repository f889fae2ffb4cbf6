"""One source per planner setting: role ollama's argument_specs (equal to its defaults/main.yml,
tests/unit/test_argument_specs.py) feed the planner's defaults; roles/ollama/tasks/plan.yml passes every setting
and nothing else; docs/planner.md's table shows the same defaults."""

import pathlib
import re

import yaml

REPO = pathlib.Path(__file__).resolve().parents[4]
# Given by plan.yml from facts, not from an ollama_* variable of the same name.
COMPUTED = {"host", "reserved_ports"}


def spec_options():
    specs = yaml.safe_load((REPO / "roles/ollama/meta/argument_specs.yml").read_text(encoding="utf-8"))
    return specs["argument_specs"]["main"]["options"]


def test_planner_defaults_are_the_argument_specs(planner):
    options = spec_options()
    assert set(planner.DEFAULTS) == set(planner.SETTINGS) | COMPUTED
    for key in planner.SETTINGS:
        assert f"ollama_{key}" in options, f"planner setting {key} has no ollama_{key} in the argument specs"
        assert planner.DEFAULTS[key] == options[f"ollama_{key}"].get("default"), key


def test_plan_yml_passes_every_setting_once(planner):
    tasks = yaml.safe_load((REPO / "roles/ollama/tasks/plan.yml").read_text(encoding="utf-8"))
    (config,) = [t["ansible.builtin.set_fact"]["_ollama_plan_config"] for t in tasks
                 if "_ollama_plan_config" in (t.get("ansible.builtin.set_fact") or {})]
    from_vars = {k: v for k, v in config.items() if k not in COMPUTED}
    assert sorted(from_vars) == sorted(planner.SETTINGS)
    for key, value in from_vars.items():
        assert str(value).startswith(f"{{{{ ollama_{key} "), f"plan.yml gives {key} from {value!r}, not ollama_{key}"


def test_docs_table_shows_the_same_defaults(planner):
    text = (REPO / "docs/planner.md").read_text(encoding="utf-8")
    shown = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`ollama_(\w+)`", cells[0]) if len(cells) >= 3 else []
        if not names:
            continue
        values = cells[1].split(", ") if len(names) > 1 else [cells[1]]
        for name, value in zip(names, values, strict=True):
            shown[name] = value.strip("`")
    missing = set(planner.SETTINGS) - set(shown)
    assert not missing, f"docs/planner.md's table lacks {sorted(missing)}"
    for key in planner.SETTINGS:
        default = planner.DEFAULTS[key]
        if default is None:  # computed from facts (ollama_advertise_address): the table says how
            continue
        assert yaml.safe_load(shown[key]) == default, f"docs/planner.md shows ollama_{key} = {shown[key]}, spec {default!r}"
