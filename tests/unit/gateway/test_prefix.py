"""Prefix-cache routing in the gateway's Lua (run inside the real nginx with the Lua module): the chain of block
hashes in each API dialect, the longest cached prefix chosen, the imbalance bound, session pins, conversation mode
and the prefix-hit histogram of /herd/pools."""

import json

import pytest
from conftest import run_lua
from test_routing import _server

LUA_TEST = r"""
local affinity = require("herd_gateway.affinity")
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local stats = require("herd_gateway.stats")
local cjson = require("cjson.safe")
local out = {}
local record = cjson.decode(io.open(SERVERS_FILE):read("*a"))
local function configure(extra)
    local s = {affinity = "prefix", affinity_ttl = "60s", endpoints = ENDPOINTS, prefix_block_bytes = 256,
               prefix_max_blocks = 64, prefix_max_imbalance = 1}
    for k, v in pairs(extra or {}) do s[k] = v end
    local cfg = settings.build(s, record, {}, function(a) return "127.0.0.1" end)
    settings.configure(cfg)
    return cfg
end
local cfg = configure()
local hex = function(list)
    local r = {}
    for i, h in ipairs(list or {}) do r[i] = ngx.encode_base64(h) end
    return r
end
local function chain(path, doc, tenant, model)
    local h, b = affinity.chain(model or "tiny:latest", path, doc, tenant)
    return {h = hex(h), b = b or {}}
end
-- the dialects: a long shared system prompt + tools, then turns
local sys = string.rep("You are a coding agent. ", 40)   -- 960 bytes: 4 blocks of 256
local tools = {{name = "read_file", input_schema = {type = "object"}}}
local u1 = {role = "user", content = "fix the bug in parser.go"}
local a1 = {role = "assistant", content = "looking", tool_calls = {{["function"] = {name = "read_file"}}}}
local u2 = {role = "user", content = "now run the tests"}
out.chat1 = chain("/api/chat", {messages = {{role = "system", content = sys}, u1}, tools = tools})
out.chat2 = chain("/api/chat", {messages = {{role = "system", content = sys}, u1, a1, u2}, tools = tools})
out.openai2 = chain("/v1/chat/completions", {messages = {{role = "system", content = sys}, u1, a1, u2}, tools = tools})
out.chat_other = chain("/api/chat", {messages = {{role = "system", content = sys}, u2}, tools = tools})
out.chat_tenant = chain("/api/chat", {messages = {{role = "system", content = sys}, u1}, tools = tools}, "team-b")
out.chat_model = chain("/api/chat", {messages = {{role = "system", content = sys}, u1}, tools = tools}, nil, "small:7b")
out.msg1 = chain("/v1/messages", {system = sys, tools = tools, messages = {u1}})
out.msg2 = chain("/v1/messages", {system = {{type = "text", text = sys}}, tools = tools,
                                  messages = {u1, {role = "assistant", content = {{type = "text", text = "ok"}}}, u2}})
out.resp1 = chain("/v1/responses", {instructions = sys, tools = tools, input = {u1}})
out.resp2 = chain("/v1/responses", {instructions = sys, tools = tools,
                                    input = {u1, {type = "function_call_output", call_id = "c1", output = "x"}}})
out.resp_text = chain("/v1/responses", {instructions = sys, input = "fix the bug"})
out.gen1 = chain("/api/generate", {system = "s", prompt = string.rep("p", 600)})
out.gen2 = chain("/api/generate", {system = "s", prompt = string.rep("p", 600) .. " and more"})
out.none = chain("/api/chat", {messages = {}})
out.embed = chain("/api/embed", {input = "x"})
local capped = chain("/api/generate", {prompt = string.rep("z", 256 * 100)})
out.capped = #capped.h

-- the longest cached prefix wins; ties go to the most recent server; a shorter match is a fallback
local by = cfg.by_key
local doc1 = {messages = {{role = "system", content = sys}, u1}, tools = tools}
local doc2 = {messages = {{role = "system", content = sys}, u1, a1, u2}, tools = tools}
local doc_new = {messages = {{role = "system", content = sys}, {role = "user", content = "a new task"}}, tools = tools}
local function plan(doc, session)
    return affinity.plan("tiny:latest", "/api/chat", doc, session)
end
local function names(p)
    local r = {}
    for i, e in ipairs(p and p.preferred or {}) do r[i] = e.server.key .. "=" .. e.bytes end
    return r
end
out.plan_empty = names(plan(doc1))
affinity.record(plan(doc1), by["b:0"])          -- session 1, turn 1 on b:0
affinity.record(plan(doc_new), by["b:1"])       -- session 2, turn 1 on b:1 (shares the system prompt and tools)
out.plan_turn2 = names(plan(doc2))              -- b:0 holds its whole first turn; b:1 only the shared part
out.plan_new = names(plan({messages = {{role = "system", content = sys}, {role = "user", content = "third"}},
                           tools = tools}))
out.cached_turn2 = plan(doc2).cached
out.chain_turn2 = #plan(doc2).chain

-- freshness: an instance's slots hold about its last num_parallel prompts (4 here): after four other prompts on
-- b:0, its record of session 1 is stale; b:1 still holds the shared system prompt and tools
local function other(i)
    return {messages = {{role = "user", content = "unrelated prompt " .. i .. string.rep(" pad", 20)}}}
end
for i = 1, 3 do affinity.record(plan(other(i)), by["b:0"]) end
out.fresh_after_3 = names(plan(doc2))
affinity.record(plan(other(4)), by["b:0"])
out.stale_after_4 = names(plan(doc2))
affinity.record(plan(doc1), by["b:0"])                 -- served again: fresh again
out.fresh_again = names(plan(doc2))
out.sequence_b0 = ngx.shared.herd_gateway:get("g:b:0")
-- without a host cache (prefix_host_cache_bytes 0: Ollama before 0.30) no byte count is kept
out.host_bytes_unkept = ngx.shared.herd_gateway:get("gb:b:0") == nil

-- choice and the imbalance bound (prefix_max_imbalance = 1, weights 2, max_conns 2 ... see the servers)
local function key_of(s) return s and s.key or "none" end
local picks = {}
local p2 = plan(doc2)
picks[1] = key_of(slots.acquire("tiny:latest", nil, p2.preferred))   -- b:0: cached, idle
picks[2] = key_of(slots.acquire("tiny:latest", nil, p2.preferred))   -- b:0 again: 2 in flight, others 0: 2 > 0*w+1? w=4
-- b:0 has max_conns 4 and weight 4: at 2 in flight vs least loaded 0 -> over the bound (1): least loaded
picks[3] = key_of(slots.acquire("tiny:latest", nil, p2.preferred))
out.picks = picks
out.inflight_after = {}
for _, key in ipairs({"b:0", "b:1", "b:2"}) do
    out.inflight_after[key] = ngx.shared.herd_gateway:get("i:" .. key) or 0
end
for _, key in ipairs({"b:0", "b:0", "b:1", "b:2"}) do slots.give_back(key) end
for _, key in ipairs({"b:0", "b:1", "b:2"}) do
    local n = ngx.shared.herd_gateway:get("i:" .. key) or 0
    if n > 0 then for _ = 1, n do slots.give_back(key) end end
end
-- the bound follows the least loaded one: all at 2, b:0 at 3 is within 1 of it
for _, key in ipairs({"b:1", "b:1", "b:2", "b:2", "b:0", "b:0", "b:0"}) do
    ngx.shared.herd_gateway:incr("i:" .. key, 1, 0)
end
out.loaded_pick = key_of(slots.acquire("tiny:latest", nil, p2.preferred))   -- b:0 (3 <= 2/4*4 + 1)
out.over_pick = key_of(slots.acquire("tiny:latest", nil, p2.preferred))     -- b:0 at 4 = max_conns: full -> other
-- never past max_conns, whatever the preference
for _ = 1, 12 do slots.acquire("tiny:latest", nil, p2.preferred) end
out.full = {}
for _, key in ipairs({"b:0", "b:1", "b:2"}) do out.full[key] = ngx.shared.herd_gateway:get("i:" .. key) or 0 end
ngx.shared.herd_gateway:flush_all()

-- a session identifier pins its instance past the bound (only a free slot counts)
local ps = plan(doc_new, "sess-1")
affinity.record(ps, by["b:2"])
for _ = 1, 3 do ngx.shared.herd_gateway:incr("i:b:2", 1, 0) end
local ps2 = plan(doc2, "sess-1")
out.session_first = ps2.preferred[1].server.key .. (ps2.preferred[1].pin and ":pin" or "")
out.session_pick = key_of(slots.acquire("tiny:latest", nil, ps2.preferred))   -- b:2 at 3 of 4: pinned
ngx.shared.herd_gateway:flush_all()

-- conversation mode: one block, the conversation key (model + first messages)
configure({affinity = "conversation"})
ngx.shared.herd_affinity:flush_all()
local c1 = affinity.plan("tiny:latest", "/api/chat", doc1)
out.conv_chain = #c1.chain
out.conv_bytes = c1.bytes == nil
affinity.record(c1, by["b:1"])
local c2 = affinity.plan("tiny:latest", "/api/chat", doc2)
out.conv_turn2 = names(c2)
out.conv_new = names(affinity.plan("tiny:latest", "/api/chat", doc_new))

-- Ollama 0.30+ (llama-server) keeps the prompts its slots gave up in host memory: with prefix_host_cache_bytes a
-- record stays fresh past num_parallel other prompts while the instance served fewer bytes than that since
configure({prefix_host_cache_bytes = 1500})
ngx.shared.herd_affinity:flush_all()
ngx.shared.herd_gateway:flush_all()
affinity.record(plan(doc1), by["b:0"])
local doc1_bytes = ngx.shared.herd_gateway:get("gb:b:0")
for i = 1, 8 do affinity.record(plan(other(i)), by["b:0"]) end
out.host_fresh_after_8 = names(plan(doc2))
out.host_bytes_after_8 = ngx.shared.herd_gateway:get("gb:b:0") - doc1_bytes
for i = 9, 20 do affinity.record(plan(other(i)), by["b:0"]) end
out.host_stale_after_20 = names(plan(doc2))
out.host_bytes_after_20 = ngx.shared.herd_gateway:get("gb:b:0") - doc1_bytes
out.doc1_bytes = doc1_bytes
ngx.shared.herd_gateway:flush_all()

-- pending marks (a burst of one agent's new sessions): a request admitted with nothing cached marks the blocks it
-- evaluates; a new session of the same agent sees them pending (one waiter) until the request's log phase settles
configure({prefix_max_wait = "3s", prefix_prefill_rate = 2000, prefix_host_cache_bytes = 0})
ngx.shared.herd_affinity:flush_all()
ngx.shared.herd_gateway:flush_all()
local first = plan(doc1)
out.pending_first = first.pending == nil
local id = affinity.mark(first, by["b:0"])
out.pending_marked = id ~= nil
local second = plan(doc_new)   -- the same system prompt and tools, another task
out.pending_wait = second.pending and second.pending.wait
out.pending_same_id = second.pending ~= nil and second.pending.id == id
out.pending_unpinned = plan(doc_new, "sess-pending").pending ~= nil  -- a session with no instance yet: may wait
affinity.record(plan(other(97), "sess-pending"), by["b:2"])          -- the session's instance: b:2
out.pending_pinned = plan(doc_new, "sess-pending").pending == nil    -- pinned: its pin decides, no wait
ngx.shared.herd_affinity:set("xw:" .. id, 1)                      -- another request waits for it already
out.pending_claimed = plan(doc_new).pending == nil
ngx.shared.herd_affinity:delete("xw:" .. id)
-- await: claims, waits until the marked request settles (here after 0.2 s) or its bound, then plans again
-- (a marked request records where its chain is at the end of its answer, then settles: herd_gateway.log)
ngx.timer.at(0.2, function() affinity.record(first, by["b:0"]); affinity.settle(id) end)
local waiter = plan(doc_new)
local t0 = ngx.now()
out.await_waited = affinity.await(waiter)
ngx.update_time()
out.await_took = ngx.now() - t0
out.await_prefers = names(waiter)
out.await_second = affinity.await(plan(doc_new))                     -- settled: nothing pending, no wait
out.pending_settled = plan(doc_new).pending == nil
-- a prompt not worth PENDING_MIN (0.25 s) of prefill is not marked; prefix_max_wait 0 marks nothing
configure({prefix_max_wait = "3s", prefix_prefill_rate = 1000000, prefix_host_cache_bytes = 0})
out.pending_short = affinity.mark(plan(other(99)), by["b:1"]) == nil
configure({prefix_max_wait = "0", prefix_prefill_rate = 2000, prefix_host_cache_bytes = 0})
out.pending_off = affinity.mark(plan(other(98)), by["b:1"]) == nil
ngx.shared.herd_affinity:flush_all()
ngx.shared.herd_gateway:flush_all()

configure({affinity = true})
out.mode_true = settings.cfg.affinity
configure({affinity = false})
out.mode_false = settings.cfg.affinity or "off"

-- the prefix-hit histogram (bytes, cumulative)
stats.observe_prefix("tiny:latest", 0)
stats.observe_prefix("tiny:latest", 900)
stats.observe_prefix("tiny:latest", 70000)
stats.observe_prefix("tiny:latest", nil)
out.hist = stats.prefix_bytes("tiny:latest")
ngx.say(cjson.encode(out))
"""


@pytest.fixture(scope="module")
def lua(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    servers = {"servers": [_server("b:0", ["tiny"], 4, num_parallel=4), _server("b:1", ["tiny"], 4, num_parallel=4),
                           _server("b:2", ["tiny"], 4, num_parallel=4), _server("b:4", ["small:7b"], 2)]}
    (tmp / "servers.json").write_text(json.dumps(servers))
    code = LUA_TEST.replace("SERVERS_FILE", json.dumps(str(tmp / "servers.json")))
    return run_lua(tmp, code, dicts=("herd_gateway", "herd_queue", "herd_affinity"))


def prefix_of(short, long):
    return len(short["h"]) <= len(long["h"]) and long["h"][:len(short["h"])] == short["h"]


def test_a_later_turn_extends_the_chain_in_every_dialect(lua):
    for first, later in (("chat1", "chat2"), ("msg1", "msg2"), ("resp1", "resp2")):
        assert lua[first]["h"], first
        assert prefix_of(lua[first], lua[later]) and len(lua[later]["h"]) > len(lua[first]["h"]), (first, later)
    # a raw prompt that grows: its whole blocks are shared, the last (partial) one differs
    gen1, gen2 = lua["gen1"]["h"], lua["gen2"]["h"]
    assert len(gen1) == len(gen2) == 4 and gen1[:3] == gen2[:3] and gen1[3] != gen2[3]
    # the same conversation in OpenAI's chat dialect is the same chain as Ollama's
    assert lua["openai2"]["h"] == lua["chat2"]["h"]
    # the block sizes: blocks end where parts end, none longer than 256 bytes; bytes are cumulative
    bytes_ = lua["chat2"]["b"]
    steps = [b - a for a, b in zip([0] + bytes_[:-1], bytes_, strict=True)]
    assert all(0 < step <= 256 for step in steps), steps


def test_sessions_of_one_agent_share_the_system_and_tools_blocks_only(lua):
    one, other = lua["chat1"]["h"], lua["chat_other"]["h"]
    shared = next(i for i, (a, b) in enumerate(zip(one, other, strict=False)) if a != b)
    # the 960-byte system prompt (4 blocks of 256), then the tools (1 block)
    assert 5 <= shared <= 6 and len(one) == shared + 1
    # the tenant and the model are part of every hash: nothing is shared across them
    for name in ("chat_tenant", "chat_model"):
        assert not set(lua[name]["h"]) & set(one), name
    assert not lua["none"]["h"] and not lua["embed"]["h"]  # (an empty Lua table encodes as {})
    assert lua["capped"] == 64, "gateway_prefix_max_blocks caps the chain"
    # the system prompt comes first (then the tools, as templates render them): the same instructions without tools
    # share the system blocks only
    text, resp1 = lua["resp_text"]["h"], lua["resp1"]["h"]
    assert text[:4] == resp1[:4] and text[4] != resp1[4]


def test_the_longest_cached_prefix_comes_first(lua):
    assert not lua["plan_empty"]
    turn2 = lua["plan_turn2"]
    # b:0 served the whole first turn: its match is longer than b:1's (the shared system prompt and tools)
    assert [entry.split("=")[0] for entry in turn2] == ["b:0", "b:1"]
    b0, b1 = (int(entry.split("=")[1]) for entry in turn2)
    assert b0 > b1 > 900
    assert lua["cached_turn2"] < lua["chain_turn2"]
    # a new session of the same agent: the most recent server of the shared blocks first
    assert [entry.split("=")[0] for entry in lua["plan_new"]][:1] == ["b:1"]


def test_a_record_is_stale_once_the_instance_served_num_parallel_other_prompts(lua):
    assert [entry.split("=")[0] for entry in lua["fresh_after_3"]] == ["b:0", "b:1"]
    assert [entry.split("=")[0] for entry in lua["stale_after_4"]] == ["b:1"]
    assert [entry.split("=")[0] for entry in lua["fresh_again"]] == ["b:0", "b:1"]
    assert lua["sequence_b0"] == 6  # every request sent to b:0 with a chain took a number
    assert lua["host_bytes_unkept"] is True  # gateway_prefix_host_cache_bytes 0: no byte count written or read


def test_a_host_memory_cache_keeps_a_record_fresh_for_its_bytes(lua):
    """gateway_prefix_host_cache_bytes (Ollama 0.30+'s llama-server keeps the prompts its slots gave up): fresh
    past num_parallel other prompts while the instance served at most that many prompt bytes since."""
    assert lua["doc1_bytes"] > 960  # the byte count grows by each prompt's bytes (system prompt, tools, turn)
    assert lua["host_bytes_after_8"] <= 1500 < lua["host_bytes_after_20"]
    assert [entry.split("=")[0] for entry in lua["host_fresh_after_8"]] == ["b:0"]
    assert lua["host_stale_after_20"] == {}  # (an empty Lua table encodes as {})


def test_the_imbalance_bound_and_max_conns(lua):
    # 1: cached and idle; 2: b:0 at 1 of 4 (1 <= 0 + 1); 3: b:0 at 2 > 0 + 1: the least loaded one
    assert lua["picks"][:2] == ["b:0", "b:0"] and lua["picks"][2] in ("b:1", "b:2")
    assert lua["inflight_after"]["b:0"] == 2
    # b:0 at 3 with the others at 2 of 4 (load 0.5, weight 4 -> 2): 3 <= 2 + 1
    assert lua["loaded_pick"] == "b:0"
    assert lua["over_pick"] in ("b:1", "b:2")
    assert lua["full"] == {"b:0": 4, "b:1": 4, "b:2": 4}


def test_a_session_identifier_pins_past_the_bound(lua):
    assert lua["session_first"] == "b:2:pin"
    assert lua["session_pick"] == "b:2"


def test_conversation_mode_is_the_one_block_case(lua):
    assert lua["conv_chain"] == 1 and lua["conv_bytes"] is True
    assert [entry.split("=")[0] for entry in lua["conv_turn2"]] == ["b:1"]
    assert not lua["conv_new"]
    assert lua["mode_true"] == "prefix" and lua["mode_false"] == "off"


def test_prefix_hit_histogram(lua):
    hist = lua["hist"]
    assert hist["count"] == 3 and hist["sum"] == 70900
    assert hist["buckets"]["0"] == 1 and hist["buckets"]["1024"] == 2 and hist["buckets"]["65536"] == 2
    assert hist["buckets"]["262144"] == 3 and hist["buckets"]["+Inf"] == 3


def test_a_burst_of_new_sessions_waits_for_the_first_ones_prefill(lua):
    """Pending marks (issue 31): the first request of an agent marks the blocks it evaluates; the next new session of
    that agent plans a wait for it (as long as its prefill would save), one waiter at most, until the first one's
    log phase records where its chain is and settles the mark; then its plan prefers that instance."""
    assert lua["pending_first"] is True and lua["pending_marked"] is True
    # the shared system prompt and tools (about 1000 bytes) at 2000 bytes/s: about half a second
    assert lua["pending_same_id"] is True and 0.45 <= lua["pending_wait"] <= 0.6, lua["pending_wait"]
    assert lua["pending_unpinned"] is True and lua["pending_pinned"] is True  # a pinned session never waits
    assert lua["pending_claimed"] is True
    assert lua["await_waited"] is True and 0.15 <= lua["await_took"] < 0.45, lua["await_took"]
    assert [entry.split("=")[0] for entry in lua["await_prefers"]] == ["b:0"]
    assert lua["await_second"] is False and lua["pending_settled"] is True
    assert lua["pending_short"] is True and lua["pending_off"] is True
