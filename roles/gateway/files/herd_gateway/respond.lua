-- herd gateway: the JSON the gateway writes itself (its own errors, the catalogue, /herd/pools).
--
-- Owns: canonical (JSON with sorted keys: every worker writes the same text), encode_list (a named list that
-- stays a JSON array when empty), answer (an error answer) and busy (the busy answer with Retry-After).
-- Shared-dict keys: none.
local cjson = require("cjson.safe")
local settings = require("herd_gateway.settings")

local _M = {}

-- JSON with object keys in sorted order, so that every worker writes the same text for the same data (cjson
-- follows Lua's table order). Empty tables are written as {} (as cjson does).
local function canonical(value)
    if type(value) ~= "table" then
        return cjson.encode(value)
    end
    local n = #value
    local parts = {}
    if n > 0 then
        for index = 1, n do
            parts[index] = canonical(value[index])
        end
        return "[" .. table.concat(parts, ",") .. "]"
    end
    local keys = {}
    for key in pairs(value) do
        keys[#keys + 1] = tostring(key)
    end
    table.sort(keys)
    for index, key in ipairs(keys) do
        parts[index] = cjson.encode(key) .. ":" .. canonical(value[key])
    end
    return "{" .. table.concat(parts, ",") .. "}"
end
_M.canonical = canonical

-- {"<name>":[...]} with the list written as a JSON array even when empty (cjson writes {} for an empty table).
function _M.encode_list(name, items, prefix)
    local parts = {}
    for index, item in ipairs(items) do
        parts[index] = type(item) == "string" and item or canonical(item)
    end
    return "{" .. (prefix or "") .. cjson.encode(name) .. ":[" .. table.concat(parts, ",") .. "]}"
end

-- Answer the request with `status` and {"error": message} (and Retry-After when given); ends the request.
function _M.answer(status, message, retry_after)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json; charset=utf-8"
    if retry_after then
        ngx.header["Retry-After"] = tostring(retry_after)
    end
    ngx.say(cjson.encode({ error = message }))
    return ngx.exit(ngx.HTTP_OK)
end

-- The gateway's busy answer: gateway_busy_status with gateway_retry_after.
function _M.busy(message)
    local cfg = settings.cfg
    return _M.answer(cfg.busy_status, message, cfg.retry_after)
end

return _M
