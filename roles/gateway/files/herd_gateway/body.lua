-- herd gateway: the request body: read it, scan its JSON members, rewrite what herd forces.
--
-- Owns: read_body, object_members (a scanner over JSON text cjson already validated: each member's raw text),
-- rewrite_body (keep_alive dropped under client_keep_alive ignore, gateway_model_options merged into `options`
-- of native endpoints, every other member byte for byte).
-- Shared-dict keys: none.
local cjson = require("cjson.safe")
local settings = require("herd_gateway.settings")

local _M = {}

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
        members[#members + 1] = { key = key, raw = text:sub(i, value_end - 1) }
        i = skip_ws(value_end)
        if text:sub(i, i) ~= "," then
            break
        end
        i = skip_ws(i + 1)
    end
    return members
end

-- The body to send upstream: `keep_alive` dropped (client_keep_alive ignore) and forced options merged into
-- `options` (native endpoints); every other member keeps its exact text. Returns nil when nothing changes.
function _M.rewrite_body(text, doc, kind, forced)
    local drop_keep_alive = settings.cfg.client_keep_alive == "ignore" and doc.keep_alive ~= nil
    local force = kind == "native" and forced and next(forced) ~= nil
    if not drop_keep_alive and not force then
        return nil
    end
    local members = _M.object_members(text)
    if not members then
        return nil
    end
    local out = {}
    local options_done = false
    local function forced_options(existing_raw)
        local parts = {}
        local existing = existing_raw and _M.object_members(existing_raw) or {}
        for _, m in ipairs(existing) do
            if forced[m.key] == nil then
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
    for _, m in ipairs(members) do
        if m.key == "keep_alive" and drop_keep_alive then -- luacheck: ignore 542
            -- dropped: the instance keeps the model as herd configured it
        elseif m.key == "options" and force then
            out[#out + 1] = '"options":' .. forced_options(m.raw:sub(1, 1) == "{" and m.raw or nil)
            options_done = true
        else
            out[#out + 1] = cjson.encode(m.key) .. ":" .. m.raw
        end
    end
    if force and not options_done then
        out[#out + 1] = '"options":' .. forced_options(nil)
    end
    return "{" .. table.concat(out, ",") .. "}"
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
