-- herd gateway: model names as Ollama matches them.
--
-- Owns: model_key, the rule that turns a request's or an instance's model name into its pool name, and
-- short_for_error, the bounded, sanitised echo of a name in an error answer.
-- Shared-dict keys: none.
--
-- A port of plugins/module_utils/ollama_names.py (parse_name + shortest_name, Ollama's types/model/name.go), the
-- one source of the rule; tests/unit/gateway/test_names.py runs both on cases generated from the Python side.
-- Linear time: the length cap comes before anything else, every scan is a plain find or a byte loop, and the only
-- patterns are anchored single-class runs over parts of at most 350 bytes.
local _M = {}

local DEFAULT_HOST = "registry.ollama.ai"
local DEFAULT_NAMESPACE = "library"
local DEFAULT_TAG = "latest"
local MISSING_PART = "!MISSING!"
local KINDS = { skill = true, agent = true, mcp = true }
-- ollama_names.MAX_NAME_BYTES: longer names are invalid before any parsing.
_M.MAX_NAME_BYTES = 1024
-- Bytes of a name shown in an error answer.
local ECHO_BYTES = 64

-- ASCII blanks (ollama_names.BLANKS): space, \t, \n, \v, \f, \r.
local BLANK = { [32] = true, [9] = true, [10] = true, [11] = true, [12] = true, [13] = true }

local function trim(s)
    local i, j = 1, #s
    while i <= j and BLANK[s:byte(i)] do
        i = i + 1
    end
    while j >= i and BLANK[s:byte(j)] do
        j = j - 1
    end
    return s:sub(i, j)
end

-- Position of the last `sep` (one byte) in s, or nil.
local function last_index(s, sep)
    local last
    local i = 0
    while true do
        i = s:find(sep, i + 1, true)
        if not i then
            return last
        end
        last = i
    end
end

-- Split s at its last sep; a part promised by sep but empty becomes MISSING_PART (as Ollama does).
local function cut_promised(s, sep)
    local i = last_index(s, sep)
    if not i then
        return s, "", false
    end
    local before, after = s:sub(1, i - 1), s:sub(i + 1)
    return (before ~= "" and before or MISSING_PART), (after ~= "" and after or MISSING_PART), true
end

local function strip_scheme(host)
    local i = host:find("://", 1, true)
    if i then
        return host:sub(i + 3)
    end
    return host
end

-- Characters allowed after the first (the first is always [A-Za-z0-9_]).
local PART_PATTERN = {
    host = "^[A-Za-z0-9_][A-Za-z0-9_%-%.:]*$",
    namespace = "^[A-Za-z0-9_][A-Za-z0-9_%-]*$",
    model = "^[A-Za-z0-9_][A-Za-z0-9_%-%.]*$",
    tag = "^[A-Za-z0-9_][A-Za-z0-9_%-%.]*$",
}

local function valid_part(kind, s)
    local limit = kind == "host" and 350 or 80
    if #s < 1 or #s > limit then
        return false
    end
    return s:find(PART_PATTERN[kind]) ~= nil
end

-- The parts of a name (host, namespace, kind, model, tag) with the defaults filled in, or nil when Ollama would
-- refuse it.
function _M.parse(s)
    if type(s) ~= "string" or #s > _M.MAX_NAME_BYTES then
        return nil
    end
    local rest = trim(s)
    local n = { host = "", namespace = "", kind = "", model = "", tag = "" }
    local promised, middle
    if (last_index(rest, ":") or 0) > (last_index(rest, "/") or 0) then
        rest, n.tag = cut_promised(rest, ":")
    end
    rest, n.model, promised = cut_promised(rest, "/")
    if not promised then
        n.model = rest
    else
        rest, middle, promised = cut_promised(rest, "/")
        if not promised then
            n.namespace = rest
        elseif not KINDS[middle] then
            n.namespace = middle
            n.host = strip_scheme(rest)
        else
            n.kind = middle
            local namespace
            rest, namespace, promised = cut_promised(rest, "/")
            if not promised then
                n.namespace = rest
            else
                n.namespace = namespace
                n.host = strip_scheme(rest)
            end
        end
    end
    if n.host == "" then
        n.host = DEFAULT_HOST
    end
    if n.namespace == "" then
        n.namespace = DEFAULT_NAMESPACE
    end
    if n.tag == "" then
        n.tag = DEFAULT_TAG
    end
    for _, part in ipairs({ "host", "namespace", "model", "tag" }) do
        if not valid_part(part, n[part]) then
            return nil
        end
    end
    return n
end

-- The pool name: Ollama's shortest form (`x:latest`, `ns/x:tag`, `host/ns/x:tag`) in lower case, or nil.
function _M.model_key(name)
    local n = _M.parse(name)
    if not n then
        return nil
    end
    local middle = n.kind ~= "" and (n.kind .. "/") or ""
    local key
    if n.host:lower() ~= DEFAULT_HOST then
        key = n.host .. "/" .. n.namespace .. "/" .. middle .. n.model .. ":" .. n.tag
    elseif n.namespace:lower() ~= DEFAULT_NAMESPACE then
        key = n.namespace .. "/" .. middle .. n.model .. ":" .. n.tag
    else
        key = middle .. n.model .. ":" .. n.tag
    end
    return key:lower()
end

-- A name as an error answer may show it: at most ECHO_BYTES bytes of the characters a valid name can hold (any
-- other byte becomes "?"), "..." when cut. Never the whole of a long or binary name.
function _M.short_for_error(name)
    if type(name) ~= "string" then
        return "?"
    end
    local shown = name:sub(1, ECHO_BYTES):gsub("[^A-Za-z0-9_%-%.:/@]", "?")
    if #name > ECHO_BYTES then
        shown = shown .. "..."
    end
    return shown
end

return _M
