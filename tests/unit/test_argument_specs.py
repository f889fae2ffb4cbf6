"""Every role's meta/argument_specs.yml must describe exactly the knobs in its defaults/main.yml.

Runs over every role under roles/ (roles without defaults are skipped). For each role it checks that the
option names of the `main` entry point equal the top-level keys of the defaults, that each literal default
has the type the spec declares, and that a `default:` written in the spec equals the value in defaults.
"""

from __future__ import annotations

import pathlib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads Ansible's tags (!unsafe, !vault) as plain scalars."""


def _plain(loader, _suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)


_Loader.add_multi_constructor("!", _plain)


def load_yaml(path):
    with open(path, encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_Loader)  # noqa: S506 - SafeLoader subclass


def role_defaults(role):
    """Merged top-level defaults of a role (defaults/main.yml, main.yaml or defaults/main/*.yml), or None."""
    base = role / "defaults"
    files = [base / "main.yml", base / "main.yaml"]
    files += sorted((base / "main").glob("*.y*ml")) if (base / "main").is_dir() else []
    found = [f for f in files if f.is_file()]
    if not found:
        return None
    merged = {}
    for f in found:
        data = load_yaml(f) or {}
        assert isinstance(data, dict), f"{f.relative_to(REPO)} must be a mapping"
        merged.update(data)
    return merged


def role_spec(role):
    """Options of the `main` entry point, from meta/argument_specs.yml or meta/main.yml; None if absent."""
    for name in ("argument_specs.yml", "argument_specs.yaml", "main.yml", "main.yaml"):
        path = role / "meta" / name
        if path.is_file():
            specs = (load_yaml(path) or {}).get("argument_specs")
            if specs is not None:
                main = specs.get("main")
                assert main is not None, f"{path.relative_to(REPO)} has no `main` entry point"
                return main.get("options") or {}
    return None


TYPE_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "path": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


def is_templated(value):
    return isinstance(value, str) and "{{" in value


ROLE_DIRS = sorted(p for p in ROLES.iterdir() if p.is_dir()) if ROLES.is_dir() else []


def test_roles_exist():
    assert ROLE_DIRS, f"no roles under {ROLES}"


@pytest.mark.parametrize("role", ROLE_DIRS, ids=[p.name for p in ROLE_DIRS])
def test_argument_specs_match_defaults(role):
    defaults = role_defaults(role)
    if defaults is None:
        pytest.skip(f"role {role.name} has no defaults")
    spec = role_spec(role)
    assert spec is not None, f"role {role.name} has defaults but no meta/argument_specs.yml"

    missing = sorted(set(defaults) - set(spec))
    extra = sorted(set(spec) - set(defaults))
    assert not missing and not extra, (
        f"role {role.name}: in defaults but not in argument_specs: {missing}; "
        f"in argument_specs but not in defaults: {extra}"
    )

    problems = []
    for name, option in spec.items():
        option = option or {}
        value = defaults[name]
        kind = option.get("type", "str")
        if value is not None and not is_templated(value) and kind in TYPE_CHECKS:
            if not TYPE_CHECKS[kind](value):
                problems.append(f"{name}: spec type {kind}, default {value!r}")
        if kind == "list" and isinstance(value, list) and option.get("elements") in TYPE_CHECKS:
            bad = [v for v in value if not is_templated(v) and not TYPE_CHECKS[option["elements"]](v)]
            if bad:
                problems.append(f"{name}: elements {option['elements']}, default holds {bad!r}")
        if "choices" in option and value is not None and not is_templated(value):
            values = value if kind == "list" else [value]
            if any(v not in option["choices"] for v in values):
                problems.append(f"{name}: default {value!r} not in choices {option['choices']!r}")
        if "default" in option and option["default"] != value:
            problems.append(f"{name}: spec default {option['default']!r} != defaults {value!r}")
    assert not problems, f"role {role.name}: " + "; ".join(problems)


def test_checks_catch_a_mismatch(tmp_path):
    """The helpers see a knob missing from the spec and a wrong type (guards against a test that cannot fail)."""
    role = tmp_path / "demo"
    (role / "defaults").mkdir(parents=True)
    (role / "meta").mkdir()
    (role / "defaults" / "main.yml").write_text("demo_a: 1\ndemo_b: !unsafe '{{ x }}'\n", encoding="utf-8")
    (role / "meta" / "argument_specs.yml").write_text(
        "argument_specs:\n  main:\n    options:\n      demo_a: {type: str}\n", encoding="utf-8"
    )
    assert set(role_defaults(role)) - set(role_spec(role)) == {"demo_b"}
    assert not TYPE_CHECKS["str"](role_defaults(role)["demo_a"])


# Roles whose preflight entry point playbooks/preflight.yml runs before any host changes.
PREFLIGHT_PLAY = (REPO / "playbooks" / "preflight.yml").read_text()
PREFLIGHT_ROLES = [p for p in ROLE_DIRS if f"name: {p.name}\n        tasks_from: preflight" in PREFLIGHT_PLAY]


@pytest.mark.parametrize("role", PREFLIGHT_ROLES, ids=[p.name for p in PREFLIGHT_ROLES])
def test_preflight_entry_point_validates_the_main_spec(role):
    """playbooks/preflight.yml runs each role's tasks_from: preflight; Ansible validates only the options of the
    entry point it runs, so the preflight entry point must carry the main spec (choices, types) or bad values pass."""
    specs = yaml.load((role / "meta" / "argument_specs.yml").read_text(), Loader=_Loader)["argument_specs"]
    assert "preflight" in specs, f"role {role.name}: argument_specs has no preflight entry point"
    assert specs["preflight"].get("options") == specs["main"].get("options"), (
        f"role {role.name}: the preflight entry point's options differ from main's"
    )
