"""roles/gateway_vip/filter_plugins: the cross-host checks of the floating address, one message per problem."""

import os

import pytest
from herd_testing import load_module

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
f = load_module("roles/gateway_vip/filter_plugins/gateway_vip.py", "gateway_vip")


def _host(own, **over):
    s = {"address": "172.29.216.250", "interface": "eth0", "router_id": 51, "auth_pass_set": True, "auth_pass_len": 8,
         "host_address": own, "host_prefix": 24, "allow": ["127.0.0.1/32", "172.29.216.0/24"], "other_router_ids": {}}
    s.update(over)
    return s


def _pair(**over_gw1):
    return {"gw1": _host("172.29.216.2", **over_gw1), "gw2": _host("172.29.216.3")}


def test_a_good_pair_has_no_problem():
    assert f.gateway_vip_problems(_pair(), "gw1") == []
    assert f.gateway_vip_problems(_pair(), "gw2") == []
    # No address: nothing to check.
    assert f.gateway_vip_problems({"gw1": _host("10.0.0.2", address="")}, "gw1") == []


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"address": "10.9.9.9"}, ["gateway_vip_address 10.9.9.9 is outside gw1's network 172.29.216.0/24", "use a free address"]),
        ({"address": "172.29.216.255"}, ["broadcast address"]),
        ({"address": "172.29.216.3"}, ["own address of gw2"]),
        ({"address": "fd00::1"}, ["IPv6"]),
        ({"address": "gw.example"}, ["is not an IP address"]),
        ({"auth_pass_set": False, "auth_pass_len": 0}, ["gateway_vip_auth_pass is empty", "vault_gateway_vip_auth_pass"]),
        ({"auth_pass_len": 12}, ["longer than 8 characters"]),
        ({"router_id": 0}, ["gateway_vip_router_id 0 must be a VRRP id 1-255"]),
        ({"router_id": 52}, ["gateway_vip_router_id is 52 on gw1 but 51 on gw2", "same VRRP id"]),
        ({"other_router_ids": {"office_vip": 51}}, ["clashes with VRRP instance office_vip", "pick another gateway_vip_router_id"]),
        ({"host_address": ""}, ["gateway_vip_interface 'eth0' has no IPv4 address"]),
        ({"allow": ["172.29.216.0/24"]}, ["add 127.0.0.1/32 to gateway_allow"]),
    ],
)
def test_each_bad_setting_is_named_with_its_fix(over, words):
    problems = " ".join(f.gateway_vip_problems(_pair(**over), "gw1"))
    for word in words:
        assert word in problems, problems


def test_one_gateway_only_is_refused():
    problems = f.gateway_vip_problems({"gw1": _host("172.29.216.2")}, "gw1")
    assert any("only host of group gateways" in p and 'gateway_vip_address to ""' in p for p in problems), problems
    # A run limited to one host of a pair is not "one gateway".
    assert f.gateway_vip_problems({"gw1": _host("172.29.216.2")}, "gw1", gateway_count=2) == []


def test_hosts_must_share_the_address():
    pair = _pair()
    pair["gw2"]["address"] = "172.29.216.251"
    assert any("must share the same floating address" in p for p in f.gateway_vip_problems(pair, "gw1"))


def test_router_ids_of_other_instances_in_a_keepalived_conf():
    conf = """! other
vrrp_instance office_vip {
    virtual_router_id 51   # the office's
}
vrrp_instance herd_gateway {
    virtual_router_id 60
}
"""
    assert f.gateway_vip_router_ids(conf, "herd_gateway") == {"office_vip": 51}
    assert f.gateway_vip_router_ids("", "herd_gateway") == {}


def test_peers_are_the_other_gateways_sorted_and_distinct():
    hosts = {"gw1": _host("172.29.216.10"), "gw2": _host("172.29.216.9"), "gw3": _host("172.29.216.9")}
    assert f.gateway_vip_peers(hosts, "gw1") == ["172.29.216.9"]
    assert f.gateway_vip_peers(hosts, "gw2") == ["172.29.216.9", "172.29.216.10"]
    assert f.gateway_vip_peers({"a": _host("10.0.0.2"), "b": _host("10.0.0.10"), "c": _host("10.0.0.3")}, "c") == [
        "10.0.0.2", "10.0.0.10"]
    assert f.gateway_vip_peers({"gw1": _host("10.0.0.2")}, "gw1") == []


@pytest.mark.parametrize("address", ["", None, "fd00::2", "eth0"])
def test_a_peer_without_an_ipv4_address_is_an_error(address):
    with pytest.raises(f.AnsibleFilterError, match="gw2"):
        f.gateway_vip_peers({"gw1": _host("10.0.0.2"), "gw2": _host(address)}, "gw1")
