"""Every molecule scenario's hosts come from the one platform definition, HERD_SYSTEMD_HOST in the repository's
.env.yml, which molecule reads before it renders molecule.yml (its --env-file; the base config cannot hold
platforms: molecule merges dicts but replaces lists). A scenario's platform is `<<: ${HERD_SYSTEMD_HOST}` plus its
own keys; it may override only the keys in OVERRIDABLE, and never repeats a shared key with the shared value.
Rendering uses molecule's own interpolation, as `molecule` does."""

from __future__ import annotations

import pathlib

import pytest
import yaml
from molecule.interpolation import Interpolator, TemplateWithDefaults
from molecule.model import schema_v3

from molecule import util

REPO = pathlib.Path(__file__).resolve().parents[2]
SCENARIOS = sorted(REPO.glob("molecule/*/molecule.yml"))
ENV = yaml.safe_load((REPO / ".env.yml").read_text())
SHARED = yaml.safe_load(ENV["HERD_SYSTEMD_HOST"])
MERGE_LINE = "- <<: ${HERD_SYSTEMD_HOST}"
# Keys a scenario may set differently: more capabilities (a nested engine or a firewall needs NET_ADMIN), another
# lab image (Debian 13).
OVERRIDABLE = {
    "capabilities": lambda value: set(SHARED["capabilities"]) <= set(value),
    "image": lambda value: value.startswith("herd-base:"),
}


BASE = (REPO / ".config" / "molecule" / "config.yml").read_text()


def render(text: str, env: dict) -> dict:
    return yaml.safe_load(Interpolator(TemplateWithDefaults, env).interpolate(text, keep_string="MOLECULE_"))


def problems(text: str) -> list[str]:
    """What makes a scenario's platforms differ from the one definition; [] when none."""
    found = []
    raw = render(text, {"HERD_SYSTEMD_HOST": "{}"})  # only what the scenario itself writes
    rendered = render(text, ENV)
    items = [line.strip() for line in text.splitlines() if line.startswith("  - ") and line.find(":") > 0]
    platform_items = items[: len(raw["platforms"])]
    for own, full, item in zip(raw["platforms"], rendered["platforms"], platform_items, strict=True):
        name = full.get("name", "?")
        if item != MERGE_LINE:
            found.append(f"{name}: does not start with {MERGE_LINE!r}")
        for key, shared in SHARED.items():
            if key in own and own[key] == shared:
                found.append(f"{name}: repeats the shared {key}")
            elif key in own and not (key in OVERRIDABLE and OVERRIDABLE[key](own[key])):
                found.append(f"{name}: overrides {key} ({own[key]!r})")
            elif key not in full:
                found.append(f"{name}: lacks {key}")
    return found


def test_the_definition_is_a_systemd_host():
    assert SHARED["command"] == "/lib/systemd/systemd"
    assert SHARED["stop_signal"] == "SIGRTMIN+3"
    assert SHARED["pre_build_image"] is True and SHARED["pull"] is False
    assert "SYS_ADMIN" in SHARED["capabilities"]


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.parent.name)
def test_scenario_platforms_share_the_one_definition(path):
    assert problems(path.read_text()) == []


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.parent.name)
def test_rendered_platform_is_the_definition_plus_the_scenario_keys(path):
    rendered = render(path.read_text(), ENV)
    for platform in rendered["platforms"]:
        for key, shared in SHARED.items():
            assert key in OVERRIDABLE or platform[key] == shared, (platform["name"], key)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.parent.name)
def test_rendered_scenario_passes_molecules_schema(path):
    """ansible-lint skips molecule.yml (it cannot render ${HERD_SYSTEMD_HOST}); molecule's own schema checks it here."""
    config = util.merge_dicts(render(BASE, ENV), render(path.read_text(), ENV))
    assert schema_v3.validate(config) == []


def test_a_copied_block_or_a_missing_merge_is_caught():
    copied = (
        "platforms:\n  - name: h1\n    image: herd-base:bookworm\n    pre_build_image: true\n    pull: false\n"
        "    command: /lib/systemd/systemd\n    capabilities: [SYS_ADMIN]\n    cgroupns_mode: host\n"
        "    volumes: [/sys/fs/cgroup:/sys/fs/cgroup:rw]\n    tmpfs: [/run, /tmp]\n    stop_signal: SIGRTMIN+3\n"
    )
    found = problems(copied)
    assert "h1: does not start with '- <<: ${HERD_SYSTEMD_HOST}'" in found
    assert "h1: repeats the shared command" in found
    changed = "platforms:\n  - <<: ${HERD_SYSTEMD_HOST}\n    name: h2\n    capabilities: [NET_ADMIN]\n    tmpfs: [/run]\n"
    assert problems(changed) == ["h2: overrides capabilities (['NET_ADMIN'])", "h2: overrides tmpfs (['/run'])"]
