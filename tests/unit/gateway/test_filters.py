"""Unit tests of roles/gateway/filter_plugins/gateway.py."""

import pytest


def contract(plan, advertise):
    """Plan entries as role ollama publishes them (ollama_instances): local_url, endpoint and loopback_only."""
    out = []
    for inst in plan:
        bind = inst["bind_address"]
        local = "127.0.0.1" if bind in ("0.0.0.0", "") else bind
        adv = f"[{advertise}]" if ":" in advertise else advertise
        out.append(dict(inst, loopback_only=bind in ("127.0.0.1", "::1"), local_url=f"http://{local}:{inst['port']}",
                        endpoint=f"{adv}:{inst['port']}"))
    return out


PLAN_GPU1 = [
    {"id": 0, "name": "ollama-0", "port": 11434, "bind_address": "0.0.0.0", "num_parallel": 4, "models": ["a:1"]},
    {"id": 1, "name": "ollama-1", "port": 11435, "bind_address": "0.0.0.0", "num_parallel": 2, "models": ["b:1"]},
]
PLAN_GW = [{"id": 0, "name": "ollama-0", "port": 11434, "bind_address": "127.0.0.1", "num_parallel": 1}]


def hostvars():
    # The gateway reads only the published plan: endpoint (from ollama_advertise_address, else ansible_host, else
    # the inventory name, computed by role ollama) and local_url.
    return {
        "gpu1": {"ollama_instances": contract(PLAN_GPU1, "10.0.0.11")},
        "gpu2": {"ollama_instances": contract(PLAN_GPU1, "192.168.5.12")},
        "gw": {"ollama_instances": contract(PLAN_GW, "10.0.0.1")},
        "bare": {"ollama_instances": contract(PLAN_GPU1, "bare")},
        "local-only": {"ollama_instances": contract(PLAN_GW, "10.0.0.9")},
        "unplanned": {"ansible_host": "10.0.0.13"},
    }


def test_servers_addresses_and_limits(gw):
    servers = gw.gateway_servers(["gpu1", "gpu2", "gw", "bare"], hostvars(), "gw", queue_per_instance=2)
    by_key = {s["key"]: s for s in servers}
    assert by_key["gpu1:0"]["endpoint"] == "10.0.0.11:11434"
    assert by_key["gpu2:1"]["endpoint"] == "192.168.5.12:11435"
    assert by_key["gw:0"]["endpoint"] == "127.0.0.1:11434"  # the gateway itself dials loopback
    assert by_key["bare:0"]["address"] == "bare"  # no ansible_host: the inventory name
    assert by_key["gpu1:0"]["max_conns"] == 6 and by_key["gpu1:1"]["max_conns"] == 4
    assert by_key["gpu1:0"]["weight"] == 4 and by_key["gw:0"]["weight"] == 1
    assert by_key["gpu1:0"]["models"] == ["a:1"]
    assert len(servers) == 7


def test_weights_backups_and_flat_weight(gw):
    servers = gw.gateway_servers(
        ["gpu1"], hostvars(), "gw", weights={"gpu1:1": 7}, backups=["gpu1:0"], weight_by_parallel=False
    )
    assert [(s["weight"], s["backup"]) for s in servers] == [(1, True), (7, False)]
    servers = gw.gateway_servers(["gpu1"], hostvars(), "gw", weights={"gpu1": 3})
    assert [s["weight"] for s in servers] == [3, 3]
    with pytest.raises(gw.AnsibleFilterError, match="1 or more"):
        gw.gateway_servers(["gpu1"], hostvars(), "gw", weights={"gpu1": 0})


def test_loopback_instance_of_remote_host_is_refused(gw):
    with pytest.raises(gw.AnsibleFilterError, match="ollama_bind_address"):
        gw.gateway_servers(["local-only"], hostvars(), "gw")


def test_unplanned_host_keeps_previous_servers_or_fails(gw):
    with pytest.raises(gw.AnsibleFilterError, match="no instance plan for unplanned"):
        gw.gateway_servers(["gpu1", "unplanned"], hostvars(), "gw")
    previous = [{"key": "unplanned:0", "host": "unplanned", "endpoint": "10.0.0.13:11434"}]
    servers = gw.gateway_servers(["gpu1", "unplanned"], hostvars(), "gw", previous=previous)
    assert [s["key"] for s in servers] == ["gpu1:0", "gpu1:1", "unplanned:0"]


def test_duplicate_endpoint_is_refused(gw):
    hv = hostvars()
    hv["gpu3"] = {"ollama_instances": contract(PLAN_GPU1, "10.0.0.11")}
    with pytest.raises(gw.AnsibleFilterError, match="both reached at 10.0.0.11:11434"):
        gw.gateway_servers(["gpu1", "gpu3"], hv, "gw")


def test_negative_queue_and_bad_plan(gw):
    with pytest.raises(gw.AnsibleFilterError, match="0 or more"):
        gw.gateway_servers(["gpu1"], hostvars(), "gw", queue_per_instance=-1)
    with pytest.raises(gw.AnsibleFilterError, match="bad entry"):
        gw.gateway_servers(["x"], {"x": {"ollama_instances": [{"id": 0}]}}, "gw")


def test_ipv6_endpoint(gw):
    servers = gw.gateway_servers(["v6"], {"v6": {"ollama_instances": contract(PLAN_GPU1, "fd00::5")}}, "gw")
    assert servers[0]["endpoint"] == "[fd00::5]:11434" and servers[0]["address"] == "fd00::5"
    # The gateway on the instance's own host dials its local_url, IPv6 loopback included.
    plan = [dict(PLAN_GPU1[0], bind_address="::", loopback_only=False, local_url="http://[::1]:11434",
                 endpoint="[fd00::5]:11434")]
    servers = gw.gateway_servers(["v6"], {"v6": {"ollama_instances": plan}}, "v6")
    assert servers[0]["endpoint"] == "[::1]:11434" and servers[0]["address"] == "::1"


def test_server_errors_lists_every_problem_without_raising(gw):
    hv = hostvars()
    hv["gpu3"] = {"ollama_instances": contract(PLAN_GPU1, "10.0.0.11")}
    errors = gw.gateway_server_errors(["gpu1", "gpu3", "local-only", "unplanned"], hv, "gw", weights={"gpu1:0": 0})
    assert len(errors) == 5, errors
    assert any(e.startswith("gateway_weights: weight of gpu1:0 must be") and "Fix:" in e for e in errors)
    assert any("instance 0 of local-only listens on 127.0.0.1 only" in e and "ollama_bind_address" in e for e in errors)
    assert any("both reached at 10.0.0.11:11434" in e and "Fix:" in e for e in errors)
    assert any("no instance plan for unplanned" in e for e in errors)
    assert gw.gateway_server_errors(["gpu1", "gw"], hv, "gw") == []
    assert "has no upstream server" in gw.gateway_server_errors([], hv, "gw")[0]
    # The same problems raise in gateway_servers, all in one message.
    with pytest.raises(gw.AnsibleFilterError, match="gateway_weights.*both reached"):
        gw.gateway_servers(["gpu1", "gpu3"], hv, "gw", weights={"gpu1:0": "heavy"})


def test_port_errors_against_the_plan_of_the_gateway_host(gw):
    plan = contract(PLAN_GPU1, "10.0.0.11")
    assert gw.gateway_port_errors(plan, http_port=80, https_port=443, tls_enabled=True) == []
    assert gw.gateway_port_errors([], http_port=11434) == []
    (msg,) = gw.gateway_port_errors(plan, http_port=11435)
    assert msg.startswith("gateway_http_port 11435 is the port of instance 1 on this host") and "Fix: move ollama_base_port" in msg
    assert gw.gateway_port_errors(plan, https_port=11434) == []  # HTTPS not served
    assert "gateway_https_port 11434" in gw.gateway_port_errors(plan, https_port=11434, tls_enabled=True)[0]


def test_select_and_mark_down(gw):
    servers = gw.gateway_servers(["gpu1", "gw"], hostvars(), "gw")
    assert [s["key"] for s in gw.gateway_select(servers, ["gpu1"])] == ["gpu1:0", "gpu1:1"]
    assert [s["key"] for s in gw.gateway_select(servers, ["gw:0", "gw"])] == ["gw:0"]
    marked = gw.gateway_mark_down(servers, ["gpu1:1"])
    assert [s["down"] for s in marked] == [False, True, False]
    assert "down" not in servers[0]  # input untouched
    with pytest.raises(gw.AnsibleFilterError, match="names no gateway server"):
        gw.gateway_select(servers, ["gpu9"])
    assert gw.gateway_known_targets(["gpu9", "gpu1:1", "gpu1:1", "gw"], servers) == ["gpu1:1", "gw"]


def test_cidr_errors(gw):
    assert gw.gateway_cidr_errors(["10.0.0.0/8", "127.0.0.1/32", "fd00::/8", "192.168.1.7"]) == []
    errors = gw.gateway_cidr_errors(["10.0.0.1/8", "300.1.1.1/32", "lan"])
    assert len(errors) == 3 and "10.0.0.1/8" in errors[0]
    assert "empty" in gw.gateway_cidr_errors([])[0]


K1 = "k1-0123456789abcdefghijklmnopqrstuv"
K2 = "K2-ZYXWVUTSRQPONMLKJIHGFEDCBA-987654"


def test_api_keys(gw):
    keys = gw.gateway_api_keys([K1, {"name": "team-a", "key": K2}])
    assert [(k["name"], k["key"]) for k in keys] == [("key0", K1), ("team-a", K2)]
    # The digest the Lua compares (sha1 of the prefix + key), distinct for keys that differ only in case.
    assert keys[0]["digest"] == gw.gateway_key_digest(K1) and len(keys[0]["digest"]) == 40
    assert gw.gateway_key_digest(K1) != gw.gateway_key_digest(K1.upper())
    with pytest.raises(gw.AnsibleFilterError) as err:
        gw.gateway_api_keys([{"name": "x", "key": 'short"; }'}])
    assert "short" not in str(err.value)  # the key is never echoed
    with pytest.raises(gw.AnsibleFilterError, match="twice"):
        gw.gateway_api_keys([{"name": "a", "key": K1}, {"name": "a", "key": K2}])
    with pytest.raises(gw.AnsibleFilterError, match="name"):
        gw.gateway_api_keys([{"name": "a b", "key": K1}])


def test_api_key_limits(gw):
    keys = gw.gateway_api_keys([K1, {"name": "team-a", "key": K2, "models": ["Llama3.2", "llama3.2:latest", "qwen3:8b"],
                                     "max_requests": 4, "tokens_per_minute": "50000"}])
    assert keys[0]["limits"] == {"max_requests": 0, "tokens_per_minute": 0, "weight": 1, "priority": "interactive"}
    # Models become their pools (Ollama's name rule, lower case), once each.
    assert keys[1]["limits"] == {"max_requests": 4, "tokens_per_minute": 50000, "models": ["llama3.2:latest", "qwen3:8b"],
                                 "weight": 1, "priority": "interactive"}
    with pytest.raises(gw.AnsibleFilterError, match="tokens_per_minute of 'b' needs the gateway's token accounting"):
        gw.gateway_api_keys([{"name": "b", "key": K1, "tokens_per_minute": 5}], token_accounting=False)
    batch = gw.gateway_api_keys([{"name": "b", "key": K1, "weight": "3", "priority": "batch"}])
    assert batch[0]["limits"] == {"max_requests": 0, "tokens_per_minute": 0, "weight": 3, "priority": "batch"}
    for entry, message in (
        ({"max_request": 1}, r"unknown fields \['max_request'\]"),
        ({"max_requests": -1}, "max_requests of 'b' must be a whole number of 0 or more"),
        ({"tokens_per_minute": True}, "tokens_per_minute of 'b'"),
        ({"tokens_per_minute": "1e6"}, "tokens_per_minute of 'b'"),
        ({"models": "llama3.2"}, "must be a non-empty list"),
        ({"models": []}, "must be a non-empty list"),
        ({"models": ["no such name!"]}, "not a model name Ollama accepts"),
        ({"weight": 0}, "weight of 'b' must be a whole number from 1 to 1000"),
        ({"weight": 1.5}, "weight of 'b'"),
        ({"weight": 1001}, "weight of 'b'"),
        ({"priority": "urgent"}, "priority of 'b' must be one of interactive, batch"),
    ):
        with pytest.raises(gw.AnsibleFilterError, match=message) as err:
            gw.gateway_api_keys([{"name": "b", "key": K1, **entry}])
        assert K1 not in str(err.value)


def test_api_key_strength(gw):
    with pytest.raises(gw.AnsibleFilterError, match="32-256 characters") as err:
        gw.gateway_api_keys(["k1-0123456789abcdefghij"])  # 23 characters
    assert "k1-0123" not in str(err.value)
    assert gw.gateway_api_keys(["k1-0123456789abcdefghij"], min_length=20)[0]["name"] == "key0"
    with pytest.raises(gw.AnsibleFilterError, match="fewer than 10 distinct"):
        gw.gateway_api_keys(["abcabc" * 8])
    with pytest.raises(gw.AnsibleFilterError, match="below 16"):
        gw.gateway_api_keys([K1], min_length=8)


def test_size_errors(gw):
    assert gw.gateway_size_errors({"a": "16m", "b": "64k", "c": "1024"}) == []
    errors = gw.gateway_size_errors({"a": "0", "b": "16 MB", "c": "-1m"})
    assert len(errors) == 3 and "a='0' is not a positive nginx size" in errors[0]


def test_client_options_errors(gw):
    hostvars = {"gpu1": {"ollama_instances": [{"id": 0, "port": 1, "models": ["qwen2.5:7b"]}]}}
    ok = gw.gateway_routing_errors(["gpu1"], hostvars, {}, client_options={"*": ["num_ctx"], "qwen2.5:7b": ["num_gpu"]})
    assert ok == []
    text = "; ".join(gw.gateway_routing_errors(["gpu1"], hostvars, {}, client_options={"a b": ["num_ctxx"], "x": "num_ctx"}))
    assert "'a b' is not a model name" in text and "'num_ctxx' not an Ollama option" in text
    assert "gateway_client_options['x'] must be a list" in text


def test_duration_errors(gw):
    assert gw.gateway_duration_errors({"a": "600s", "b": "10", "c": "500ms", "d": "1h"}) == []
    assert len(gw.gateway_duration_errors({"a": "10 minutes", "b": "banana", "c": "-1s"})) == 3


def test_cidr_errors_name_the_variable_and_the_fix(gw):
    (allow,) = gw.gateway_cidr_errors(["10.0.0.1/8"])
    assert allow.startswith("gateway_allow entry '10.0.0.1/8'") and "Fix:" in allow
    (proxy,) = gw.gateway_cidr_errors(["lan"], "gateway_real_ip_from")
    assert proxy.startswith("gateway_real_ip_from entry 'lan'") and "Fix:" in proxy
    assert gw.gateway_cidr_errors([], "gateway_real_ip_from") == []
