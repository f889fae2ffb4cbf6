"""roles/instance_firewall templates: herd's nftables table, its unit and the drop-ins that tie it to
nftables.service and to what starts the instances (rendered with the role's vars, no Ansible needed)."""

import os
import re

import jinja2
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ROLE = os.path.join(ROOT, "roles", "instance_firewall")
RULES = "etc/nftables.d/herd-instances.nft.j2"
UNIT = "etc/systemd/system/herd-instance-firewall.service.j2"
NFT_DROPIN = "etc/systemd/system/nftables.service.d/herd-instance-firewall.conf.j2"
REQUIRES_DROPIN = "etc/systemd/system/unit.d/herd-instance-firewall.conf.j2"


def _values(**over):
    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as fh:
        values = yaml.safe_load(fh)
    with open(os.path.join(ROLE, "vars", "main.yml"), encoding="utf-8") as fh:
        values.update({k: v for k, v in yaml.safe_load(fh).items() if "{{" not in str(v)})
    values.update(ansible_managed="Managed by herd (test)", _instance_firewall_ports=[11435, 11434],
                  _instance_firewall_sources=["10.0.0.1", "10.0.0.250", "fd00::1"])
    values.update(over)
    return values


def render(template, **over):
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(ROLE, "templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    env.filters["comment"] = lambda text: f"#\n# {text}\n#"
    env.tests["search"] = lambda value, pattern: re.search(pattern, str(value)) is not None
    return env.get_template(template).render(**_values(**over))


def _chain(text, name):
    m = re.search(rf"chain {name} {{\n(.*?)\n\t}}", text, re.S)
    return [line.strip() for line in m.group(1).splitlines()] if m else None


def test_systemd_mode_filters_input_only():
    text = render(RULES, ollama_instances=[{"id": 0, "mode": "systemd"}])
    assert "table inet herd_instances\ndelete table inet herd_instances\ntable inet herd_instances {" in text
    assert "elements = { 11434, 11435 }" in text
    assert "elements = { 10.0.0.1, 10.0.0.250 }" in text and "elements = { fd00::1 }" in text
    assert _chain(text, "input")[-1] == "tcp dport @instance_ports counter reject with tcp reset"
    assert _chain(text, "forward") is None
    assert "flush" not in text, "herd never flushes rules it does not own"


def test_container_mode_closes_the_forward_path_whatever_the_destination():
    text = render(RULES, ollama_instances=[{"id": 0, "mode": "container"}], instance_firewall_action="drop")
    rules = _chain(text, "forward")
    assert rules[0] == "type filter hook forward priority filter; policy accept;"
    # No `ct status dnat`: a packet routed straight to a container's address is checked like a published one.
    assert not any("dnat" in r for r in rules), rules
    assert rules[1:] == [
        "ct direction original meta l4proto tcp ct original proto-dst @instance_ports ip saddr @allowed_v4 accept",
        "ct direction original meta l4proto tcp ct original proto-dst @instance_ports ip6 saddr @allowed_v6 accept",
        "ct direction original meta l4proto tcp ct original proto-dst @instance_ports counter drop",
    ]
    assert _chain(text, "input")[-1] == "tcp dport @instance_ports counter drop"


def test_unit_loads_after_nftables_and_reloads_without_a_restart():
    text = render(UNIT)
    assert "After=local-fs.target nftables.service" in text
    assert "ExecStart=/usr/sbin/nft -f /etc/nftables.d/herd-instances.nft" in text
    assert "ExecReload=/usr/sbin/nft -f /etc/nftables.d/herd-instances.nft" in text
    assert "ExecStop=-/usr/sbin/nft delete table inet herd_instances" in text
    # PartOf= would pass nftables.service's restarts on to the instances that require this unit.
    assert "PartOf" not in text


def test_nftables_dropin_loads_herds_table_after_every_flush():
    text = render(NFT_DROPIN)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    load = "-/usr/sbin/nft -f /etc/nftables.d/herd-instances.nft"
    assert lines == ["[Service]", f"ExecStartPost={load}", f"ExecReload={load}", f"ExecStopPost={load}"]


def test_instances_require_the_unit():
    text = render(REQUIRES_DROPIN)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == ["[Unit]", "Requires=herd-instance-firewall.service", "After=herd-instance-firewall.service"]
    with open(os.path.join(ROLE, "vars", "main.yml"), encoding="utf-8") as fh:
        dropins = yaml.safe_load(fh)["_instance_firewall_requires_dropins"]
    assert dropins == {"systemd": "/etc/systemd/system/ollama@.service.d/herd-instance-firewall.conf",
                       "container": "/etc/systemd/system/docker.service.d/herd-instance-firewall.conf"}
