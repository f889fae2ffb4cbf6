"""Checks across the gateway hosts of a floating address (role gateway_vip), as plain functions.

gateway_vip_problems(settings_by_host, this_host) -> list of messages, each naming the variable and the fix.
`settings_by_host` maps every gateway host to the facts its own preflight computed (_gateway_vip_settings):
address, interface, router_id, auth_pass_set, auth_pass_len, host_address, host_prefix, allow (gateway_allow).

gateway_vip_peers(settings_by_host, this_host) -> the other gateways' IPv4 addresses: keepalived's unicast peers and
the only sources herd's nftables table accepts VRRP adverts from.
"""

from __future__ import annotations

import ipaddress

from ansible.errors import AnsibleFilterError


def _network(address, prefix):
    return ipaddress.ip_interface(f"{address}/{prefix}").network


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def gateway_vip_problems(settings_by_host, this_host, gateway_count=None):
    """Problems of this host's floating-address settings, seen against the settings of the gateway hosts in this
    run (`settings_by_host`); `gateway_count` is the size of group gateways (the run may be limited)."""
    try:
        me = settings_by_host[this_host]
    except (KeyError, TypeError) as exc:
        raise AnsibleFilterError(f"no gateway_vip settings of {this_host}") from exc
    problems = []
    address = str(me.get("address") or "")
    if not address:
        return problems
    try:
        vip = ipaddress.ip_address(address)
    except ValueError:
        return [f"gateway_vip_address {address!r} is not an IP address: use an unused address of the gateways' network"]
    if vip.version != 4:
        return [f"gateway_vip_address {address} is IPv6: herd's keepalived setup handles IPv4 (use an IPv4 address)"]
    peers = {h: s for h, s in settings_by_host.items() if s.get("address")}
    if (len(settings_by_host) if gateway_count is None else int(gateway_count)) < 2:
        problems.append(
            f"gateway_vip_address is set but {this_host} is the only host of group gateways: add a second gateway "
            "host to share the address with, or set gateway_vip_address to \"\" for a single gateway"
        )
    for host, s in sorted(settings_by_host.items()):
        if host != this_host and str(s.get("address") or "") != address:
            problems.append(
                f"gateway_vip_address of {host} is {s.get('address') or 'unset'!s} and of {this_host} {address}: every host of "
                "group gateways must share the same floating address (set it in group_vars/gateways)"
            )
    if not me.get("host_address"):
        problems.append(
            f"gateway_vip_interface {me.get('interface')!r} has no IPv4 address on {this_host}: name the interface of "
            "the network the clients reach the gateways on (ip -br addr)"
        )
    else:
        net = _network(me["host_address"], me["host_prefix"])
        if vip not in net:
            problems.append(
                f"gateway_vip_address {address} is outside {this_host}'s network {net} on {me.get('interface')}: "
                f"use a free address of {net}, or name the interface of that network in gateway_vip_interface"
            )
        elif vip in (net.network_address, net.broadcast_address):
            problems.append(f"gateway_vip_address {address} is the network or broadcast address of {net}: use a free host address")
        for host, s in sorted(peers.items()):
            if str(s.get("host_address")) == address:
                problems.append(f"gateway_vip_address {address} is the own address of {host}: use a free address of {net}")
    router_id = _int(me.get("router_id"))
    if not isinstance(router_id, int) or not 1 <= router_id <= 255:
        problems.append(f"gateway_vip_router_id {router_id!r} must be a VRRP id 1-255")
    for host, s in sorted(peers.items()):
        if host != this_host and _int(s.get("router_id")) != router_id and str(s.get("address")) == address:
            problems.append(
                f"gateway_vip_router_id is {router_id} on {this_host} but {s.get('router_id')} on {host}: the hosts sharing "
                "an address must use the same VRRP id (set it in group_vars/gateways)"
            )
    for host, s in sorted(settings_by_host.items()):
        other = s.get("other_router_ids") or {}
        for name, rid in sorted(other.items()):
            if _int(rid) == router_id:
                problems.append(
                    f"gateway_vip_router_id {router_id} clashes with VRRP instance {name} already configured on {host}: "
                    "two VRRP groups on one network need distinct ids (pick another gateway_vip_router_id, 1-255)"
                )
    if not me.get("auth_pass_set"):
        problems.append(
            "gateway_vip_auth_pass is empty: set the VRRP password from a secret (ansible-vault: "
            "vault_gateway_vip_auth_pass in group_vars/gateways/vault.yml), the same on every gateway"
        )
    elif int(me.get("auth_pass_len") or 0) > 8:
        problems.append("gateway_vip_auth_pass is longer than 8 characters, which VRRP's PASS authentication cuts: use 1-8 characters")
    allow = me.get("allow")
    if allow is not None and not any(_loopback_allowed(c) for c in allow):
        problems.append(
            "gateway_allow does not include 127.0.0.1, so keepalived's check of /herd/health on loopback is refused: "
            "add 127.0.0.1/32 to gateway_allow"
        )
    return problems


def _loopback_allowed(cidr):
    try:
        return ipaddress.ip_address("127.0.0.1") in ipaddress.ip_network(str(cidr), strict=False)
    except ValueError:
        return False


def gateway_vip_router_ids(keepalived_conf, own_instance):
    """{instance name: virtual_router_id} of VRRP instances in a keepalived.conf other than `own_instance`."""
    ids = {}
    name = None
    for raw in (keepalived_conf or "").splitlines():
        words = raw.split("#", 1)[0].split("!", 1)[0].split()
        if len(words) >= 2 and words[0] == "vrrp_instance":
            name = words[1]
        elif len(words) >= 2 and words[0] == "virtual_router_id" and name and name != own_instance:
            try:
                ids[name] = int(words[1])
            except ValueError:
                continue
    return ids


def gateway_vip_peers(settings_by_host, this_host):
    """Sorted, distinct IPv4 addresses of every gateway host but this one (their `host_address`), the unicast peers of
    this host's VRRP instance; a host whose address is unknown or not IPv4 raises (preflight reports it first)."""
    peers = set()
    for host, s in sorted((settings_by_host or {}).items()):
        if host == this_host:
            continue
        address = str((s or {}).get("host_address") or "")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError as exc:
            raise AnsibleFilterError(f"gateway {host} has no IPv4 address on its gateway_vip_interface ({address!r})") from exc
        if ip.version != 4:
            raise AnsibleFilterError(f"gateway {host}'s address {address} is not IPv4")
        peers.add(ip)
    return [str(ip) for ip in sorted(peers)]


class FilterModule:
    def filters(self):
        return {
            "gateway_vip_problems": gateway_vip_problems,
            "gateway_vip_router_ids": gateway_vip_router_ids,
            "gateway_vip_peers": gateway_vip_peers,
        }
