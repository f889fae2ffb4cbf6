"""Every shared-dict key the gateway's Lua builds is documented in one place (herd_gateway/keys.lua, KEYS), and
each module's header names the keys it uses.

The scanner reads the Lua sources (comments and strings lexed, not grepped): a key is a concatenation that
starts with a key-prefix literal (`"q:" .. pool .. ":h"`, shape `q:<>:h`) or a literal first argument of a dict
method (`d:get("x")`) or of counters' (`counters.incr("x:id", 1)`). Keys are built that way in every module (a
key whose first part is a variable would not be seen: don't). On the code before the split, against the key list its header held, it finds r:<pool>,
q:<pool>:l:<n>, q:<pool>:a:<n> and the affinity keys' s: and p: prefixes undocumented.
"""

import os
import re

import pytest

FILES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "roles", "gateway", "files")
LUA_DIR = os.path.join(FILES, "herd_gateway")
DICT_METHODS = {"get", "get_stale", "set", "safe_set", "add", "safe_add", "replace", "incr", "delete", "ttl",
                "expire", "lpush", "rpush", "lpop", "rpop", "llen"}
KEY_PREFIX = re.compile(r"^[a-z]{1,2}:")
VAR = "<>"


def lua_sources():
    """{module name: source text} of the entry module and every module under herd_gateway/."""
    out = {"herd_gateway": open(os.path.join(FILES, "herd_gateway.lua"), encoding="utf-8").read()}
    for name in sorted(os.listdir(LUA_DIR)):
        if name.endswith(".lua"):
            out[name[:-4]] = open(os.path.join(LUA_DIR, name), encoding="utf-8").read()
    return out


def tokens(text):
    """Lua tokens as (kind, value): kind "str" (value decoded enough for key literals), "name", "op"; comments
    dropped."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith("--", i):
            long = re.match(r"--\[(=*)\[", text[i:])
            if long:
                end = text.find("]" + long.group(1) + "]", i)
                i = n if end < 0 else end + len(long.group(1)) + 2
            else:
                end = text.find("\n", i)
                i = n if end < 0 else end + 1
        elif ch in "\"'":
            j, value = i + 1, []
            while j < n and text[j] != ch:
                if text[j] == "\\":
                    value.append(text[j:j + 2])
                    j += 2
                else:
                    value.append(text[j])
                    j += 1
            out.append(("str", "".join(value)))
            i = j + 1
        elif re.match(r"\[=*\[", text[i:]):
            level = re.match(r"\[(=*)\[", text[i:]).group(1)
            end = text.find("]" + level + "]", i)
            out.append(("str", text[i + len(level) + 2:end]))
            i = end + len(level) + 2
        elif ch.isalpha() or ch == "_":
            m = re.match(r"[A-Za-z_]\w*", text[i:])
            out.append(("name", m.group(0)))
            i += len(m.group(0))
        elif ch.isdigit():
            m = re.match(r"[0-9][0-9a-fA-Fx.e]*", text[i:])
            out.append(("num", m.group(0)))
            i += len(m.group(0))
        else:
            op = text[i:i + 3] if text.startswith("...", i) else text[i:i + 2]
            if op not in ("..", "...", "==", "~=", "<=", ">=", "::"):
                op = ch
            out.append(("op", op))
            i += len(op)
    return out


def _operand_end(toks, i):
    """Index after the operand starting at toks[i] (a literal, a number, or a name with its field, index and call
    suffixes, or a parenthesised expression)."""
    kind, value = toks[i]
    if kind in ("str", "num"):
        return i + 1
    if value == "(":
        i = _close(toks, i)
    elif kind == "name":
        i += 1
    else:
        return i + 1
    while i < len(toks):
        kind, value = toks[i]
        if value == "." and i + 1 < len(toks) and toks[i + 1][0] == "name":
            i += 2
        elif value == ":" and i + 2 < len(toks) and toks[i + 1][0] == "name" and toks[i + 2][1] == "(":
            i = _close(toks, i + 2)
        elif value in ("(", "["):
            i = _close(toks, i)
        else:
            break
    return i


def _close(toks, i):
    """Index after the bracket that closes toks[i]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    depth = 0
    for j in range(i, len(toks)):
        if toks[j][0] == "op" and toks[j][1] in pairs:
            depth += 1
        elif toks[j][0] == "op" and toks[j][1] in pairs.values():
            depth -= 1
            if depth == 0:
                return j + 1
    return len(toks)


def key_shapes(text):
    """Shapes (`q:<>:g:<>`) of the keys the Lua `text` builds."""
    toks = tokens(text)
    shapes = set()
    for i, (kind, value) in enumerate(toks):
        if kind == "str" and KEY_PREFIX.match(value) and i + 1 < len(toks) and toks[i + 1] == ("op", ".."):
            if i > 0 and toks[i - 1] == ("op", ".."):
                continue  # not the start of its chain
            parts, j = [value], i + 1
            while j < len(toks) and toks[j] == ("op", ".."):
                end = _operand_end(toks, j + 1)
                parts.append(toks[j + 1][1] if end == j + 2 and toks[j + 1][0] == "str" else VAR)
                j = end
            shapes.add("".join(parts))
        elif (kind == "op" and (value == ":" or (value == "." and i > 0 and toks[i - 1] == ("name", "counters")))
              and i + 4 < len(toks) and toks[i + 1][1] in DICT_METHODS
              and toks[i + 2] == ("op", "(") and toks[i + 3][0] == "str" and toks[i + 4][1] in (",", ")")):
            shapes.add(toks[i + 3][1])
    return shapes


def documented():
    """KEYS of keys.lua: [(dict, key, owner)]."""
    text = open(os.path.join(LUA_DIR, "keys.lua"), encoding="utf-8").read()
    entries = re.findall(r'\{\s*dict\s*=\s*"([^"]+)",\s*key\s*=\s*"([^"]+)",\s*owner\s*=\s*"([^"]+)"', text)
    assert entries, "keys.lua lists no KEYS"
    return entries


def matches(doc_key, shape):
    """Whether the code's key shape is the documented key: a <name> of the documentation stands for variables
    and colon-free literal text (`s:<pool>:<stat>` covers `s:<>:count` and `s:<>:b<>`)."""
    pattern = "".join(
        r"(?:<>|[^:<>]+)+" if part.startswith("<") else re.escape(part)
        for part in re.split(r"(<[^>]+>)", doc_key) if part
    )
    return re.fullmatch(pattern, shape) is not None


def header(text):
    """The leading comment block of a module."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return "\n".join(lines)


def undocumented(shapes, docs):
    return sorted(s for s in shapes if not any(matches(key, s) for _dict, key, _owner in docs))


def test_scanner_finds_every_kind_of_key():
    code = '''
local d = ngx.shared.herd_gateway
d:incr("z:" .. pool, 1, 0)                      -- a prefix nobody documented
d:get("q:" .. pool .. ":x")                      -- a documented prefix, an undocumented shape
local k = "s:" .. ngx.md5(model .. "\\0" .. s)  -- built first, used later
d:set("plain", 1)                                -- a literal key
d:set("i:" .. server.key, 0)                     -- documented
error("herd gateway: bad duration " .. x)        -- a message, not a key
'''
    shapes = key_shapes(code)
    assert shapes == {"z:<>", "q:<>:x", "s:<>", "plain", "i:<>"}
    assert undocumented(shapes, documented()) == ["plain", "q:<>:x", "z:<>"]


def test_every_key_the_lua_builds_is_documented_in_keys_lua():
    docs = documented()
    found = {name: key_shapes(text) for name, text in lua_sources().items()}
    missing = {name: undocumented(shapes, docs) for name, shapes in found.items() if undocumented(shapes, docs)}
    assert not missing, f"keys used but not listed in herd_gateway/keys.lua KEYS: {missing}"


def test_every_documented_key_is_built_by_its_owner_only():
    found = {name: key_shapes(text) for name, text in lua_sources().items()}
    for _dict, key, owner in documented():
        users = sorted(name for name, shapes in found.items() if any(matches(key, s) for s in shapes))
        assert users == [owner], f"KEYS lists {key} with owner {owner}; the modules that build it: {users}"


@pytest.mark.parametrize("name", sorted(lua_sources()))
def test_module_header_names_its_keys(name):
    text = lua_sources()[name]
    head = header(text)
    assert "Owns" in head or name == "herd_gateway", f"{name}.lua: the header says what the module owns"
    assert "Shared-dict keys" in head, f"{name}.lua: the header says which shared-dict keys it uses"
    for shape in key_shapes(text):
        keys = [key for _dict, key, _owner in documented() if matches(key, shape) and key in head]
        assert keys, f"{name}.lua builds {shape} but its header names no documented key for it"
