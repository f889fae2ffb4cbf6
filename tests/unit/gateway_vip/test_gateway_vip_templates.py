"""roles/gateway_vip templates: keepalived accepts adverts from the peers only and runs its check unprivileged; the
nftables table drops VRRP from every other source; drop-ins load it before keepalived and after nftables' flushes."""

import os
import re

import jinja2
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ROLE = os.path.join(ROOT, "roles", "gateway_vip")
PEERS = ["172.29.216.3", "172.29.216.4"]


def render(template, **over):
    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as fh:
        values = yaml.safe_load(fh)
    with open(os.path.join(ROLE, "vars", "main.yml"), encoding="utf-8") as fh:
        values.update({k: v for k, v in yaml.safe_load(fh).items() if "{{" not in str(v)})
    values.update(
        ansible_managed="Managed by herd (test)", inventory_hostname="gw1", groups={"gateways": ["gw1", "gw2", "gw3"]},
        gateway_vip_address="172.29.216.250", gateway_vip_auth_pass="herd-lab", _gateway_vip_iface="eth0",
        _gateway_vip_priority=150, _gateway_vip_peers=PEERS,
        _gateway_vip_settings={"host_address": "172.29.216.2", "host_prefix": "24"},
    )
    values.update(over)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(ROLE, "templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    env.filters["comment"] = lambda text: f"#\n# {text}\n#"
    return env.get_template(template).render(**values)


def _words(text):
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def test_keepalived_checks_the_source_and_runs_the_check_unprivileged():
    words = _words(render("etc/keepalived/keepalived.conf.j2"))
    assert "enable_script_security" in words and "script_user herd-vip-check" in words
    assert "script_user root" not in words
    assert "check_unicast_src" in words and "unicast_src_ip 172.29.216.2" in words
    start = words.index("unicast_peer {")
    assert words[start + 1:start + 4] == [*PEERS, "}"]


def test_vrrp_filter_accepts_the_peers_only():
    text = render("etc/nftables.d/herd-vrrp.nft.j2")
    assert "table inet herd_vrrp\ndelete table inet herd_vrrp\ntable inet herd_vrrp {" in text
    assert "elements = { 172.29.216.3, 172.29.216.4 }" in text
    chain = re.search(r"chain input {\n(.*?)\n\t}", text, re.S).group(1).split("\n")
    assert [r.strip() for r in chain] == [
        "type filter hook input priority filter; policy accept;",
        "ip protocol 112 ip saddr @peers_v4 accept",
        'ip protocol 112 counter drop comment "herd: VRRP from a non-peer"',
    ]
    assert "flush" not in text
    # No peer (never past preflight): an empty set, so every advert is dropped rather than a syntax error.
    assert "elements" not in render("etc/nftables.d/herd-vrrp.nft.j2", _gateway_vip_peers=[])


def test_dropins_load_the_filter_before_keepalived_and_after_nftables_flushes():
    with open(os.path.join(ROLE, "vars", "main.yml"), encoding="utf-8") as fh:
        dropins = yaml.safe_load(fh)["_gateway_vip_dropins"]
    keepalived, nftables = (_words(render(d["src"])) for d in dropins)
    assert dropins[0]["dest"].startswith("/etc/systemd/system/keepalived.service.d/")
    assert keepalived == ["[Service]", "ExecStartPre=/usr/sbin/nft -f /etc/nftables.d/herd-vrrp.nft"]
    load = "-/usr/sbin/nft -f /etc/nftables.d/herd-vrrp.nft"
    assert nftables == ["[Service]", f"ExecStartPost={load}", f"ExecReload={load}", f"ExecStopPost={load}"]
