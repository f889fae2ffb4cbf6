"""Conversation affinity in the gateway's Lua (run inside the real nginx with the Lua module): the conversation
key, and the load bound (the preferred instance only while it has a free slot, live and in the pool)."""

import json

import pytest
from conftest import run_lua
from test_routing import _server

LUA_TEST = r"""
local affinity = require("herd_gateway.affinity")
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local cjson = require("cjson.safe")
local out = {}
local record = cjson.decode(io.open(SERVERS_FILE):read("*a"))
local cfg = settings.build({affinity = true, affinity_ttl = "60s", endpoints = ENDPOINTS}, record, {"b:3"}, function(a) return "127.0.0.1" end)
settings.configure(cfg)
local sys = {role = "system", content = "be brief"}
local u1 = {role = "user", content = "plan a trip"}
local turn1 = {model = "tiny", messages = {sys, u1}}
local turn2 = {model = "tiny", messages = {sys, u1, {role = "assistant", content = "ok"}, {role = "user", content = "more"}}}
local k = function(path, doc, session) return affinity.key("tiny:latest", path, doc, session) or "nil" end
out.key = {
    turn1 = k("/api/chat", turn1), turn2 = k("/api/chat", turn2),
    openai2 = k("/v1/chat/completions", turn2),
    other = k("/api/chat", {messages = {sys, {role = "user", content = "plan a party"}}}),
    other_model = affinity.key("small:7b", "/api/chat", turn1),
    session_a = k("/api/chat", turn1, "conv-1"), session_b = k("/api/chat", turn2, "conv-1"),
    session_c = k("/api/chat", turn1, "conv-2"),
    gen1 = k("/api/generate", {prompt = string.rep("x", 1024) .. "turn one"}),
    gen2 = k("/api/generate", {prompt = string.rep("x", 1024) .. "turn two, longer"}),
    gen_short1 = k("/api/generate", {prompt = "hello"}), gen_short2 = k("/api/generate", {prompt = "hellp"}),
    no_messages = k("/api/chat", {messages = {}}), embed = k("/api/embed", {input = "x"}),
    images = k("/api/chat", {messages = {{role = "user", content = cjson.null, images = {"AAAA"}}}}),
    tenant_b = affinity.key("tiny:latest", "/api/chat", turn1, nil, "team-b"),
    tenant_b_session = affinity.key("tiny:latest", "/api/chat", turn1, "conv-1", "team-b"),
}
-- agents: /v1/messages and /v1/responses, and the session identifiers agents send
local tools = {{name = "read_file", input_schema = {type = "object"}}}
local task_a = {{role = "user", content = "task A"}}
local task_a_later = {{role = "user", content = "task A"}, {role = "assistant", content = {{type = "text", text = "ok"}}},
                      {role = "user", content = {{type = "tool_result", tool_use_id = "t1", content = "x"}}}}
local long = string.rep("s", 5000)
out.agent = {
    msg1 = k("/v1/messages", {system = "agent", tools = tools, messages = task_a}),
    msg2 = k("/v1/messages", {system = "agent", tools = tools, messages = task_a_later}),
    msg_blocks = k("/v1/messages", {system = {{type = "text", text = "agent"}}, tools = tools, messages = task_a}),
    msg_tools = k("/v1/messages", {system = "agent", tools = {{name = "write_file"}}, messages = task_a}),
    msg_task = k("/v1/messages", {system = "agent", tools = tools, messages = {{role = "user", content = "task B"}}}),
    msg_long_a = k("/v1/messages", {system = long, messages = task_a}),
    msg_long_b = k("/v1/messages", {system = long, messages = {{role = "user", content = "task B"}}}),
    resp_text = k("/v1/responses", {instructions = "agent", tools = tools, input = "task A"}),
    resp_list1 = k("/v1/responses", {instructions = "agent", input = task_a}),
    resp_list2 = k("/v1/responses", {instructions = "agent", input = {task_a[1], {type = "function_call_output",
                                                                                   call_id = "c1", output = "x"}}}),
    resp_none = k("/v1/responses", {instructions = "agent"}),
    pck1 = k("/v1/responses", {input = "x", prompt_cache_key = "conv-9"}),
    pck2 = k("/v1/responses", {input = "y", prompt_cache_key = "conv-9"}),
    meta1 = k("/v1/messages", {messages = task_a, metadata = {user_id = "u-1"}}),
    meta2 = k("/v1/messages", {messages = {{role = "user", content = "other"}}, metadata = {user_id = "u-1"}}),
    user = k("/v1/chat/completions", {messages = turn2.messages, user = "u-1"}),
    header_wins = k("/v1/messages", {messages = task_a, metadata = {user_id = "u-1"}}, "u-2"),
    header_alone = k("/api/chat", turn1, "u-2"),
    pck_wins = k("/v1/messages", {messages = task_a, prompt_cache_key = "p", metadata = {user_id = "u-1"}}),
    pck_alone = k("/v1/responses", {prompt_cache_key = "p"}),
    meta_wins = k("/v1/chat/completions", {messages = turn1.messages, metadata = {user_id = "m"}, user = "u-1"}),
    meta_alone = k("/v1/messages", {metadata = {user_id = "m"}}),
}
local function key_of(s) return s and s.key or "none" end
local by = cfg.by_key
-- b:0 (2 slots) and b:1 (2 slots) hold tiny; b:2 (backup) too; b:3 is drained.
local picks = {}
picks[1] = key_of(slots.acquire("tiny:latest", nil, by["b:1"]))   -- preferred though both are idle
picks[2] = key_of(slots.acquire("tiny:latest", nil, by["b:1"]))   -- preferred though b:0 is less loaded
picks[3] = key_of(slots.acquire("tiny:latest", nil, by["b:1"]))   -- b:1 full: least loaded other (b:0)
slots.give_back("b:1")
picks[4] = key_of(slots.acquire("tiny:latest", nil, by["b:1"]))   -- a slot freed: back to b:1
picks[5] = key_of(slots.acquire("tiny:latest", nil, by["b:3"]))   -- drained preferred: ignored
picks[6] = key_of(slots.acquire("tiny:latest", nil, by["b:4"]))   -- not in the pool: ignored (all full: backup)
slots.give_back("b:1")
picks[7] = key_of(slots.acquire("tiny:latest", {["b:1"] = true}, by["b:1"]))  -- excluded (a retry): ignored
out.picks = picks
out.inflight = {}
for _, key in ipairs({"b:0", "b:1", "b:2", "b:3", "b:4"}) do
    out.inflight[key] = ngx.shared.herd_gateway:get("i:" .. key) or 0
end
-- a backup is never preferred over free regular instances
for _, key in ipairs({"b:0", "b:0", "b:1", "b:2", "b:2"}) do slots.give_back(key) end
out.backup_pref = key_of(slots.acquire("tiny:latest", nil, by["b:2"]))
-- the map
affinity.remember("p:x", by["b:1"])
out.lookup = key_of(affinity.lookup("p:x"))
out.lookup_missing = key_of(affinity.lookup("p:y"))
out.ttl = ngx.shared.herd_affinity:ttl("p:x")
ngx.say(cjson.encode(out))
"""


@pytest.fixture(scope="module")
def lua(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("affinity")
    servers = {"servers": [_server("b:0", ["tiny"], 2), _server("b:1", ["tiny"], 2),
                           _server("b:2", ["tiny"], 2, backup=True), _server("b:3", ["tiny"], 2),
                           _server("b:4", ["small:7b"], 2)]}
    (tmp / "servers.json").write_text(json.dumps(servers))
    code = LUA_TEST.replace("SERVERS_FILE", json.dumps(str(tmp / "servers.json")))
    return run_lua(tmp, code, dicts=("herd_gateway", "herd_queue", "herd_affinity"))


def test_conversation_key(lua):
    key = lua["key"]
    # The API key name is part of the key: another tenant's same conversation gets another entry.
    assert key["tenant_b"] not in (key["turn1"], "nil") and key["tenant_b_session"] != key["session_a"]
    assert key["turn1"].startswith("p:") and key["turn1"] == key["turn2"] == key["openai2"]
    assert len({key["turn1"], key["other"], key["other_model"], key["session_a"]}) == 4
    assert key["session_a"] == key["session_b"] != key["session_c"] and key["session_a"].startswith("s:")
    assert key["gen1"] == key["gen2"], "prompts that share their first 1024 bytes are one conversation"
    assert key["gen_short1"] != key["gen_short2"]
    assert key["no_messages"] == key["embed"] == "nil"
    assert key["images"].startswith("p:")


def test_agent_conversation_keys(lua):
    """/v1/messages and /v1/responses: system (or instructions) + tools + the first user turn; the session
    identifiers agents send win over the prefix, in the order docs/gateway.md gives."""
    key = lua["agent"]
    assert key["msg1"] == key["msg2"] == key["msg_blocks"] != "nil" and key["msg1"].startswith("p:")
    assert len({key["msg1"], key["msg_tools"], key["msg_task"]}) == 3
    assert key["msg_long_a"] != key["msg_long_b"], "a long system prompt must not hide the first user turn"
    assert key["resp_list1"] == key["resp_list2"] != key["resp_text"] and key["resp_none"] == "nil"
    assert key["pck1"] == key["pck2"] and key["pck1"].startswith("s:")
    assert key["meta1"] == key["meta2"] == key["user"] and key["meta1"].startswith("s:")
    assert key["header_wins"] == key["header_alone"] and key["pck_wins"] == key["pck_alone"]
    assert key["meta_wins"] == key["meta_alone"]


def test_preferred_instance_only_with_a_free_slot(lua):
    assert lua["picks"] == ["b:1", "b:1", "b:0", "b:1", "b:0", "b:2", "b:2"]
    # no instance past its max_conns (2 each); the drained one and the other pool's instance got nothing
    assert lua["inflight"] == {"b:0": 2, "b:1": 1, "b:2": 2, "b:3": 0, "b:4": 0}
    # a backup is not preferred while a regular instance has a free slot
    assert lua["backup_pref"] in ("b:0", "b:1")


def test_map_remembers_with_ttl(lua):
    assert lua["lookup"] == "b:1" and lua["lookup_missing"] == "none"
    assert 0 < lua["ttl"] <= 60
