-- herd gateway: the request body, read the way Ollama will read it.
--
-- Owns: read_body, object_members (a scanner over JSON text cjson already validated: each member's raw text),
-- view (the members the gateway reads, found as Go's encoding/json finds them: a member name matches without
-- regard to case, by Unicode simple folding; a member the gateway reads that appears twice, in any case, is
-- refused) and rewrite (keep_alive in any case dropped under client_keep_alive ignore; on native endpoints
-- `options` rebuilt from the client's allowed options plus gateway_model_options, which win; every other member
-- byte for byte), hold/release (the budget of request bodies held in memory at once, over every worker), held
-- (the bytes held now, for /herd/pools).
-- Shared-dict keys (herd_gateway):
--   b:held   read, written (counters.add: a dead worker's share is given back): bytes of request bodies held now
--            (reserved before a body is read, given back in the log phase)
--
-- Why refuse rather than normalise a duplicate: Ollama takes the last of `{"model":"m1","MODEL":"m2"}`, a
-- reader taking the first routes to the wrong pool, and no client sends such a body by mistake.
local cjson = require("cjson.safe")
local counters = require("herd_gateway.counters")
local keys = require("herd_gateway.keys")

local _M = {}

-- Members the gateway reads or rewrites (Ollama's field names). A second one, in any case, is refused.
_M.WATCHED = { "model", "name", "keep_alive", "options", "stream", "messages", "prompt", "system", "instructions",
    "input", "tools", "prompt_cache_key", "metadata", "user" }
local WATCHED = {}
for _, name in ipairs(_M.WATCHED) do
    WATCHED[name] = true
end

-- Go's folding of a member name (bytes.EqualFold): ASCII letters without case, and the two non-ASCII letters
-- that fold to ASCII ones: U+017F (long s) -> s, U+212A (Kelvin sign) -> k.
function _M.fold(name)
    return (name:lower():gsub("\197\191", "s"):gsub("\226\132\170", "k"))
end

-- Members of the JSON object text starting at `i` (text already validated by cjson): list of
-- {key, raw_value}, in order, with the raw text of each value. Returns nil when text is not an object.
function _M.object_members(text, i)
    local len = #text
    local function skip_ws(p)
        return text:find("[^ \t\r\n]", p) or len + 1
    end
    local function skip_string(p) -- p at the opening quote; returns the index after the closing quote
        p = p + 1
        while true do
            local q = text:find('[\\"]', p)
            if not q then
                return len + 1
            end
            if text:sub(q, q) == "\\" then
                p = q + 2
            else
                return q + 1
            end
        end
    end
    local function skip_value(p)
        local ch = text:sub(p, p)
        if ch == '"' then
            return skip_string(p)
        elseif ch == "{" or ch == "[" then
            local depth = 0
            while p <= len do
                local q = text:find('[{}%[%]"]', p)
                if not q then
                    return len + 1
                end
                local c = text:sub(q, q)
                if c == '"' then
                    p = skip_string(q)
                else
                    depth = depth + ((c == "{" or c == "[") and 1 or -1)
                    p = q + 1
                    if depth == 0 then
                        return p
                    end
                end
            end
            return p
        end
        return text:find("[,}%] \t\r\n]", p) or len + 1
    end
    i = skip_ws(i or 1)
    if text:sub(i, i) ~= "{" then
        return nil
    end
    local members = {}
    i = skip_ws(i + 1)
    if text:sub(i, i) == "}" then
        return members
    end
    while i <= len do
        local key_end = skip_string(i)
        local key = cjson.decode(text:sub(i, key_end - 1))
        i = skip_ws(key_end)
        i = skip_ws(i + 1) -- after ':'
        local value_end = skip_value(i)
        members[#members + 1] = { key = key, raw = text:sub(i, value_end - 1), folded = _M.fold(key) }
        i = skip_ws(value_end)
        if text:sub(i, i) ~= "," then
            break
        end
        i = skip_ws(i + 1)
    end
    return members
end

-- The request as Ollama reads it. `text` is the body, `doc` its cjson decoding (a table). Returns a view
-- {members, by = {field -> member}, value = function(field)} or nil and the message of a 400.
function _M.view(text, doc)
    -- The scanner reads only text cjson accepted.
    local members = type(doc) == "table" and _M.object_members(text) or nil
    if not members then
        return nil, "the request body must be a JSON object naming a model"
    end
    local by = {}
    for _, m in ipairs(members) do
        if WATCHED[m.folded] then
            if by[m.folded] then
                return nil, "the request names \"" .. m.folded .. "\" twice (member names match without regard to "
                    .. "case, as Ollama reads them): send it once"
            end
            by[m.folded] = m
        end
    end
    local view = { members = members, by = by }
    -- The decoded value of a member (no duplicates: cjson's table holds it under its own name).
    function view.value(field)
        local m = by[field]
        if m == nil then
            return nil
        end
        return doc[m.key]
    end
    return view
end

-- Options of the client that pass: a JSON object (or null) whose names are each given once (in any case).
-- Returns the members, or nil and the message of a 400.
function _M.options_members(view)
    local m = view.by.options
    if not m or m.raw == "null" then
        return {}
    end
    local members = m.raw:sub(1, 1) == "{" and _M.object_members(m.raw) or nil
    if not members then
        return nil, "options must be a JSON object of Ollama options"
    end
    local seen = {}
    for _, option in ipairs(members) do
        if seen[option.folded] then
            return nil, "the request names option \"" .. option.folded .. "\" twice: send it once"
        end
        seen[option.folded] = true
    end
    return members
end

-- The body to send upstream, or nil when it is sent as is.
-- `how`: drop_keep_alive (bool), native (bool: options are Ollama's), allowed (set of option names clients may
-- set), forced (table of options that win), options (the client's option members, from options_members).
function _M.rewrite(view, how)
    local keep_alive = how.drop_keep_alive and view.by.keep_alive ~= nil
    local options = how.native and (view.by.options ~= nil or (how.forced and next(how.forced) ~= nil))
    if not keep_alive and not options then
        return nil
    end
    local function options_text()
        local forced = how.forced or {}
        local parts = {}
        for _, m in ipairs(how.options or {}) do
            if (how.allowed or {})[m.key] and forced[m.key] == nil then
                parts[#parts + 1] = cjson.encode(m.key) .. ":" .. m.raw
            end
        end
        local names = {}
        for name in pairs(forced) do
            names[#names + 1] = name
        end
        table.sort(names)
        for _, name in ipairs(names) do
            parts[#parts + 1] = cjson.encode(name) .. ":" .. cjson.encode(forced[name])
        end
        return "{" .. table.concat(parts, ",") .. "}"
    end
    -- Pieces joined once (a large member is copied once, not once per concatenation).
    local out = { "{" }
    local options_done = false
    local function add(name_json, raw)
        if #out > 1 then
            out[#out + 1] = ","
        end
        out[#out + 1] = name_json
        out[#out + 1] = ":"
        out[#out + 1] = raw
    end
    for _, m in ipairs(view.members) do
        if m.folded == "keep_alive" and keep_alive then -- luacheck: ignore 542
            -- dropped: the instance keeps the model as herd configured it
        elseif m.folded == "options" and options then
            add('"options"', options_text())
            options_done = true
        else
            add(cjson.encode(m.key), m.raw)
        end
    end
    if options and not options_done then
        add('"options"', options_text())
    end
    out[#out + 1] = "}"
    return table.concat(out)
end

-- Reserve `bytes` of the body budget `limit` before a body is read (the Content-Length, or the endpoint's limit
-- for a chunked body). Returns true when the bodies held by every worker stay within the budget; the reservation
-- is recorded in ngx.ctx and given back by release() (log phase, every request). Returns false (and the error
-- when the dict is full) when refused.
function _M.hold(bytes, limit)
    if not limit or bytes <= 0 then
        return true
    end
    local held, err = counters.add("b:held", bytes)
    if not held then
        return false, err
    end
    if held > limit then
        counters.add("b:held", -bytes)
        return false
    end
    ngx.ctx.herd_body_held = bytes
    return true
end

-- Bytes of request bodies held now, over every worker.
function _M.held()
    return keys.gateway():get("b:held") or 0
end

-- Give the reservation back (log phase, every request). After a large body that was refused, free its Lua copies
-- now (the parse of one body costs the worker about 9x its size while it runs; see docs/gateway.md).
function _M.release()
    local bytes = ngx.ctx.herd_body_held
    if bytes then
        ngx.ctx.herd_body_held = nil
        counters.add("b:held", -bytes)
        if bytes > 1048576 and not ngx.ctx.herd_body_collected then
            collectgarbage("collect")
        end
    end
end

-- The request body (read once; from its temp file when it was larger than client_body_buffer_size), or nil.
function _M.read_body()
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body then
        return body
    end
    local file = ngx.req.get_body_file()
    if file then -- larger than client_body_buffer_size: read it back once
        local handle = io.open(file, "rb")
        if handle then
            body = handle:read("*a")
            handle:close()
            return body
        end
    end
    return nil
end

return _M
