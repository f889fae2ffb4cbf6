"""One model-name rule: the gateway's Lua port (files/herd_gateway/names.lua, run inside the real nginx) gives the
pool of every generated name exactly as the Python source does (plugins/module_utils/ollama_names.py through the
filter gateway_model_key), in linear time.
"""

import json

import pytest
from conftest import run_lua
from name_cases import fuzz_names, name_cases

LUA = r"""
local names = require("herd_gateway.names")
local cjson = require("cjson.safe")
local inputs = cjson.decode(io.open(INPUTS):read("*a"))
local out = {keys = {}, odd = {}}
for i, name in ipairs(inputs) do
    local key = names.model_key(name)
    out.keys[i] = key == nil and cjson.null or key
end
for i, value in ipairs({42, true, {}, cjson.null}) do
    out.odd[i] = names.model_key(value) == nil
end
-- Linear time: 1 MiB pathological names (an inner run of blanks, separators only) against a 4-byte one.
local function time_of(name, rounds)
    ngx.update_time()
    local start = ngx.now()
    for _ = 1, rounds do names.model_key(name) end
    ngx.update_time()
    return (ngx.now() - start) / rounds
end
local mib = 1024 * 1024
out.long_key = names.model_key("a" .. string.rep(" ", mib) .. "b") == nil
out.t_blanks = time_of("a" .. string.rep(" ", mib) .. "b", 20)
out.t_colons = time_of(string.rep(":", mib), 20)
out.t_short = time_of("tiny", 20)
out.echo_long = names.short_for_error(string.rep("x", 5000) .. '"')
out.echo_odd = names.short_for_error('a"b\0c')
ngx.say(cjson.encode(out))
"""


@pytest.fixture(scope="module")
def lua_names(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    inputs = name_cases() + fuzz_names()
    (tmp / "inputs.json").write_text(json.dumps(inputs))
    return inputs, run_lua(tmp, LUA.replace("INPUTS", json.dumps(str(tmp / "inputs.json"))))


def test_lua_port_matches_the_python_rule_on_every_generated_name(gw, lua_names):
    inputs, out = lua_names
    expected = [gw.gateway_model_key(name) for name in inputs]
    diff = [(name[:60], want, got) for name, want, got in zip(inputs, expected, out["keys"], strict=True) if want != got]
    assert not diff, diff[:20]
    # The generator reaches both answers, and every limit on both sides.
    assert sum(k is not None for k in expected) > 100 and sum(k is None for k in expected) > 100


def test_the_python_rule_on_names_that_matter(gw):
    key = gw.gateway_model_key
    assert key("https://host:5000/team/tiny:q4") == "host:5000/team/tiny:q4"  # Ollama accepts it
    assert key("a b") is None and key("tiny!") is None  # the planner refuses them, so does the gateway
    assert key("Llama3:8B") == "llama3:8b" and key("registry.ollama.ai/library/llama3") == "llama3:latest"
    assert key("herd-tiny:1b@sha256:0123abcd") is None  # Ollama's parser has no digest part
    assert key("m" * 80) == "m" * 80 + ":latest" and key("m" * 81) is None
    assert key("h" * 350 + "/n/m") is not None and key("h" * 351 + "/n/m") is None
    assert key(" " * 1023 + "x") == "x:latest" and key(" " * 1024 + "x") is None


def test_non_strings_name_no_pool(lua_names):
    assert lua_names[1]["odd"] == [True, True, True, True]


def test_linear_time_and_bounded_echo(lua_names):
    out = lua_names[1]
    assert out["long_key"] is True
    # Refused at the length cap before any scan: a 1 MiB name costs what a short one does (well under 1 ms).
    assert out["t_blanks"] < 0.001 and out["t_colons"] < 0.001, out
    assert out["echo_long"] == "x" * 64 + "..."
    assert out["echo_odd"] == "a?b?c"
