"""Routing logic of the gateway: pools from the plan, per-instance totals, the body rewrite.

Model names (the Python rule and its Lua port on generated cases) are test_names.py's.
"""

import json

import pytest
from conftest import run_lua


def _server(key, models, max_conns=2, **extra):
    host, _, port = key.partition(":")
    return {"key": key, "host": host, "address": "127.0.0.1", "port": 11434 + int(port),
            "endpoint": f"127.0.0.1:{11434 + int(port)}", "max_conns": max_conns, "weight": max_conns,
            "backup": False, "models": models, **extra}


def test_pools_from_the_plan(gw):
    hostvars = {
        "gpu1": {"ollama_instances": [
            {"id": 0, "port": 11434, "local_url": "http://127.0.0.1:11434", "endpoint": "gpu1:11434", "num_parallel": 1, "models": ["Llama3:70b"]},
            {"id": 1, "port": 11435, "local_url": "http://127.0.0.1:11435", "endpoint": "gpu1:11435", "num_parallel": 4, "models": ["library/qwen2.5:7b", "nomic-embed-text"]},
            {"id": 2, "port": 11436, "local_url": "http://127.0.0.1:11436", "endpoint": "gpu1:11436", "num_parallel": 4, "models": ["qwen2.5:7b"]},
        ]},
    }
    servers = gw.gateway_servers(["gpu1"], hostvars, "gw", queue_per_instance=0)
    assert [s["models"] for s in servers] == [["llama3:70b"], ["qwen2.5:7b", "nomic-embed-text:latest"], ["qwen2.5:7b"]]
    assert gw.gateway_pools(servers) == {
        "llama3:70b": ["gpu1:0"], "qwen2.5:7b": ["gpu1:1", "gpu1:2"], "nomic-embed-text:latest": ["gpu1:1"]}
    # One limit per instance over all its pools: gpu1:1 serves two models with 4 slots in total.
    assert gw.gateway_instance_limits(servers) == {"gpu1:0": 1, "gpu1:1": 4, "gpu1:2": 4}
    assert [s["max_conns"] for s in gw.gateway_servers(["gpu1"], hostvars, "gw", queue_per_instance=2)] == [3, 6, 6]


def test_routing_settings_errors_name_the_variable(gw):
    hostvars = {"gpu1": {"ollama_instances": [{"id": 0, "port": 1, "models": ["qwen2.5:7b"]}]}}
    assert gw.gateway_routing_errors(["gpu1"], hostvars, {"qwen2.5:7b": {"num_ctx": 8192}}) == []
    assert gw.gateway_routing_errors(["gpu1"], hostvars, {"library/qwen2.5:7b": {"num_ctx": 1}}) == []
    errors = gw.gateway_routing_errors(["gpu1"], hostvars, {"llama3": {"num_ctx": 1}}, queue_max=-1,
                                       queue_timeout="soon")
    text = "; ".join(errors)
    assert "gateway_model_options: model 'llama3' is held by no instance" in text and "Fix:" in text
    assert "gateway_queue_max=-1" in text and "gateway_queue_timeout='soon'" in text
    assert "mapping" in gw.gateway_routing_errors(["gpu1"], hostvars, ["x"])[0]
    # A batch request must be able to compete with interactive ones before its queue timeout.
    late = gw.gateway_routing_errors(["gpu1"], hostvars, {}, queue_timeout="2m", batch_aging="120s")
    assert late and "gateway_batch_aging=120s is not below gateway_queue_timeout=2m" in late[0] and "Fix:" in late[0]
    assert gw.gateway_routing_errors(["gpu1"], hostvars, {}, queue_timeout="2m", batch_aging="119500ms") == []
    assert "gateway_batch_aging='soon'" in gw.gateway_routing_errors(["gpu1"], hostvars, {}, batch_aging="soon")[0]


# ------------------------------------------------------------------------------------- Lua, in the real nginx

LUA_TEST = r"""
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local body_mod = require("herd_gateway.body")
local respond = require("herd_gateway.respond")
local cjson = require("cjson.safe")
local out = {}
-- pools and per-instance totals (the shared dict is the real one)
local record = cjson.decode(io.open(SERVERS_FILE):read("*a"))
local cfg = settings.build({queue_max = 4, client_keep_alive = "ignore", model_options = {["Small:7b"] = {num_ctx = 8192}}, endpoints = ENDPOINTS,
                        sampling_options = {"stop"}},
                       record, {"b:2"}, function(a) return "127.0.0.1" end)
settings.configure(cfg)
out.pools = {}
for _, name in ipairs(cfg.pool_names) do
    local keys = {}
    for _, s in ipairs(cfg.pools[name]) do keys[#keys + 1] = s.key .. (s.down and "(down)" or "") end
    out.pools[name] = keys
end
-- b:0 holds both models with 2 slots in total; b:1 holds tiny only, 1 slot; b:2 is drained.
local taken = {}
for i = 1, 6 do
    local model = (i % 2 == 1) and "tiny:latest" or "small:7b"
    local server = slots.acquire(model)
    taken[i] = server and server.key or "none"
end
out.taken = taken
slots.give_back("b:0")
out.after_release = (slots.acquire("small:7b") or {key = "none"}).key
-- body rewrite: keep_alive dropped, options forced, every other member byte for byte
local body = '{"model":"small:7b","messages":[],"keep_alive":0,"options":{"num_ctx":99,"stop":[]},"x":{"y":[1,"a\\"}"]}}'
local B = body_mod
local function rewrite(text, native, forced)
    local view = B.view(text, cjson.decode(text))
    return B.rewrite(view, {drop_keep_alive = true, native = native, allowed = cfg.client_options["small:7b"],
                            forced = forced, options = native and B.options_members(view) or nil})
end
out.rewritten = rewrite(body, true, cfg.model_options["small:7b"])
out.unchanged = rewrite('{"model":"tiny"}', true, nil) or cjson.null
out.openai = rewrite('{"model":"small:7b","keep_alive":"5m"}', false, cfg.model_options["small:7b"])
out.canonical = respond.canonical(cjson.decode('{"b":1,"a":[1,{"d":2,"c":null}],"e":"/"}'))
ngx.say(cjson.encode(out))
"""


LUA_SERVERS = [_server("b:0", ["tiny", "Small:7b"], 2), _server("b:1", ["tiny:latest"], 1), _server("b:2", ["small:7b"], 4)]
LUA_DRAINED = "b:2"


@pytest.fixture(scope="module")
def lua_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lua")
    servers = {"servers": LUA_SERVERS}
    (tmp / "servers.json").write_text(json.dumps(servers))
    code = LUA_TEST.replace("SERVERS_FILE", json.dumps(str(tmp / "servers.json")))
    return run_lua(tmp, code)


def test_lua_pools_and_drained_servers(lua_results):
    assert lua_results["pools"] == {"small:7b": ["b:0", "b:2(down)"], "tiny:latest": ["b:0", "b:1"]}


def test_lua_instance_limit_counts_every_pool(lua_results):
    # b:0 (2 slots, both models) and b:1 (1 slot, tiny): 3 requests in all, whichever models they name;
    # b:2 is drained and gets nothing.
    taken = lua_results["taken"]
    assert sorted(taken[:3]) == ["b:0", "b:0", "b:1"] and taken[3:] == ["none", "none", "none"], taken
    assert lua_results["after_release"] == "b:0"


def test_lua_pools_and_limits_match_the_reference(gw, lua_results):
    """gateway_pools and gateway_instance_limits (Python) are the reference model of what the Lua builds."""
    lua_pools = {model: [key.removesuffix("(down)") for key in keys] for model, keys in lua_results["pools"].items()}
    assert lua_pools == gw.gateway_pools(LUA_SERVERS)
    taken = {key: lua_results["taken"].count(key) for key in set(lua_results["taken"]) - {"none"}}
    limits = gw.gateway_instance_limits(LUA_SERVERS)
    assert taken == {key: n for key, n in limits.items() if key != LUA_DRAINED}


def test_lua_body_rewrite_keeps_every_other_member_exact(lua_results):
    assert lua_results["rewritten"] == (
        '{"model":"small:7b","messages":[],"options":{"stop":[],"num_ctx":8192},"x":{"y":[1,"a\\"}"]}}')
    assert lua_results["unchanged"] is None
    # OpenAI endpoints take no Ollama options; keep_alive is still dropped.
    assert lua_results["openai"] == '{"model":"small:7b"}'


def test_lua_catalogue_json_is_canonical(lua_results):
    # Sorted keys: every worker writes the same text for the same models.
    assert json.loads(lua_results["canonical"]) == {"a": [1, {"c": None, "d": 2}], "b": 1, "e": "/"}
    assert lua_results["canonical"].replace("\\/", "/") == '{"a":[1,{"c":null,"d":2}],"b":1,"e":"/"}'


# ----------------------------------------------------------------- the pick, against a reference model

PICK_LUA = r"""
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local cjson = require("cjson.safe")
local case = cjson.decode(io.open(CASE_FILE):read("*a"))
local out = {}
for n, one in ipairs(case) do
    local cfg = settings.build({endpoints = ENDPOINTS}, {servers = one.servers}, one.drained, function() return "127.0.0.1" end)
    settings.configure(cfg)
    ngx.shared.herd_gateway:flush_all()
    local picks = {}
    for _, op in ipairs(one.ops) do
        if op[1] == "acquire" then
            local server, any = slots.acquire("m:latest")
            picks[#picks + 1] = server and server.key or (any and "full" or "none")
        else
            slots.give_back(op[2])
        end
    end
    out[n] = picks
end
ngx.say(cjson.encode(out))
"""


def _reference_picks(case):
    """The documented rule: the least loaded (in flight / weight) live instance with a free slot, backups last,
    equal loads in turn (a rotating start: the pool's turn counter, one step per pick)."""
    servers = case["servers"]
    live = [s for s in servers if s["key"] not in case["drained"]]
    used = {s["key"]: 0 for s in servers}
    turn, picks = 0, []
    n = len(servers)
    for op in case["ops"]:
        if op[0] == "release":
            used[op[1]] = max(0, used[op[1]] - 1)
            continue
        turn += 1 if n > 1 else 0
        free = [(s["backup"], used[s["key"]] / s["weight"], (i - turn) % n, s["key"])
                for i, s in enumerate(servers) if s in live and used[s["key"]] < s["max_conns"]]
        if not free:
            picks.append("full" if live else "none")
            continue
        key = min(free)[3]
        used[key] += 1
        picks.append(key)
    return picks


def test_the_pick_follows_the_reference_on_random_pools(tmp_path):
    """200 random pools (1-12 instances, weights, slots, backups, drained ones) and random sequences of picks and
    releases: every pick of slots.acquire is the reference rule's."""
    import random

    rnd = random.Random(20261202)
    cases = []
    for _ in range(200):
        servers = []
        for i in range(rnd.randint(1, 12)):
            slots = rnd.randint(1, 4)
            servers.append(_server(f"h{i}:0", ["m"], slots, weight=rnd.choice([slots, 1, 2, 3]),
                                   backup=rnd.random() < 0.2))
        drained = [s["key"] for s in servers if rnd.random() < 0.15]
        # Releases give back a slot the rule's own picks hold at that point (both sides hold the same slots).
        ops = []
        for _ in range(rnd.randint(5, 40)):
            held = [p for p in _reference_picks({"servers": servers, "drained": drained, "ops": ops})
                    if p not in ("full", "none")]
            for op in ops:
                if op[0] == "release":
                    held.remove(op[1])
            ops.append(["release", rnd.choice(held)] if held and rnd.random() < 0.35 else ["acquire"])
        cases.append({"servers": servers, "drained": drained, "ops": ops})
    (tmp_path / "case.json").write_text(json.dumps(cases))
    got = run_lua(tmp_path, PICK_LUA.replace("CASE_FILE", json.dumps(str(tmp_path / "case.json"))))
    for n, case in enumerate(cases):
        assert got[n] == _reference_picks(case), (n, case, got[n])
