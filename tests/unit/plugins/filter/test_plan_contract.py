"""The instance plan as a published contract: role ollama's fact `ollama_instances` (docs/architecture.md).

The documented entry and the planner's output have the same fields with the same types, and the dial
addresses (local_url, endpoint) are right for IPv4, IPv6 and any-address binds.
"""

import pathlib
import re

import pytest
import yaml

DOC = pathlib.Path(__file__).resolve().parents[4] / "docs" / "architecture.md"


def documented_entry():
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Instance plan contract: `ollama_instances`", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (entry,) = yaml.safe_load(block)
    return entry


def plan(planner, gpus, **config):
    return planner.plan_instances(gpus, {"host": "gpu1", **config})


def test_documented_fields_and_types_are_the_planners(planner, gpus_from):
    doc = documented_entry()
    for config in ({}, {"bind_address": "0.0.0.0", "models": ["qwen2.5:7b"]}, {"cpu_instances": 2, "gpu_groups": []},
                   {"mode": "container"}):
        gpus = [] if config.get("cpu_instances") else gpus_from("l20x5.csv")
        for entry in plan(planner, gpus, **config):
            assert sorted(entry) == sorted(doc), "docs/architecture.md and the planner disagree on the fields"
            for key, value in doc.items():
                if key in ("unit", "container"):  # the one of the two the mode runs, the other null
                    assert isinstance(entry[key], str) == (entry["mode"] == {"unit": "systemd"}.get(key, "container"))
                    continue
                assert isinstance(entry[key], type(value)), f"{key}: documented {type(value).__name__}, got {entry[key]!r}"
                if isinstance(value, list) and value and entry[key]:
                    assert isinstance(entry[key][0], type(value[0])), key


@pytest.mark.parametrize(
    ("bind", "advertise", "loopback_only", "local_url", "endpoint"),
    [
        ("127.0.0.1", "10.0.0.11", True, "http://127.0.0.1:11434", "10.0.0.11:11434"),
        ("0.0.0.0", "10.0.0.11", False, "http://127.0.0.1:11434", "10.0.0.11:11434"),
        ("10.0.0.11", "", False, "http://10.0.0.11:11434", "gpu1:11434"),  # no advertise address: the host name
        ("::", "fd00::11", False, "http://[::1]:11434", "[fd00::11]:11434"),
        ("::1", "fd00::11", True, "http://[::1]:11434", "[fd00::11]:11434"),
        ("fd00::11", "[fd00::11]", False, "http://[fd00::11]:11434", "[fd00::11]:11434"),
        ("localhost", "gpu1.example", True, "http://127.0.0.1:11434", "gpu1.example:11434"),
    ],
)
def test_dial_addresses(planner, gpus_from, bind, advertise, loopback_only, local_url, endpoint):
    first = plan(planner, gpus_from("l20x5.csv"), bind_address=bind, advertise_address=advertise)[0]
    assert (first["loopback_only"], first["local_url"], first["endpoint"]) == (loopback_only, local_url, endpoint)
    host = first["env"]["OLLAMA_HOST"]
    assert host.endswith(":11434") and (":" not in bind or host.startswith("["))


def test_bad_advertise_address_names_the_variable(planner, gpus_from):
    errors = planner.ollama_plan_errors(gpus_from("l20x5.csv"), {"host": "gpu1", "advertise_address": "gpu 1"})
    assert errors == ["ollama_advertise_address on gpu1: 'gpu 1' is not an IP address or host name. Fix: use the "
                      "address (or DNS name) a gateway on another host dials to reach this host"]


@pytest.mark.parametrize(("mode", "unit", "container", "name"), [
    ("systemd", "ollama@1.service", None, "ollama@1"),
    ("container", None, "herd-ollama-1", "herd-ollama-1"),
])
def test_the_plan_names_the_unit_or_container_it_runs(planner, gpus_from, mode, unit, container, name):
    """Consumers (guard, status, rolling, the firewall) take these names from the plan; none rebuilds them."""
    second = plan(planner, gpus_from("l20x5.csv"), mode=mode)[1]
    assert (second["mode"], second["unit"], second["container"], second["name"]) == (mode, unit, container, name)
