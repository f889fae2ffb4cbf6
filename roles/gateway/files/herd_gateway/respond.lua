-- herd gateway: the JSON the gateway writes itself (its own errors, the catalogue, /herd/pools).
--
-- Owns: canonical (JSON with sorted keys: every worker writes the same text), encode_list (a named list that
-- stays a JSON array when empty), error_body and dialect (each API's error shape, the request's API), answer (an
-- error answer in the request's dialect) and busy (the busy answer with Retry-After).
-- Shared-dict keys: none.
local cjson = require("cjson.safe")
local endpoints = require("herd_gateway.endpoints")
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

-- Each API's error shape, so that a client's SDK reads the gateway's own answers as it reads the API's (and
-- retries where the API would: both SDKs retry 408, 409, 429 and every 5xx, and honour Retry-After). The types
-- follow Ollama's own compatibility layers (openai.NewError, anthropic.NewError), so an error reads the same
-- whether the gateway or an instance wrote it.
local OPENAI_TYPES = { [400] = "invalid_request_error", [404] = "not_found_error", [405] = "invalid_request_error",
    [413] = "invalid_request_error" }
local OPENAI_CODES = { [401] = "invalid_api_key", [429] = "rate_limit_exceeded" }
local ANTHROPIC_TYPES = { [400] = "invalid_request_error", [401] = "authentication_error", [403] = "permission_error",
    [404] = "not_found_error", [405] = "invalid_request_error", [413] = "request_too_large",
    [429] = "rate_limit_error", [503] = "overloaded_error", [529] = "overloaded_error" }

-- The error body of `status` and `message` in `dialect` ("ollama", "openai", "anthropic").
function _M.error_body(dialect, status, message)
    if dialect == "openai" then
        return cjson.encode({ error = { message = message, type = OPENAI_TYPES[status] or "api_error",
                                        param = cjson.null, code = OPENAI_CODES[status] or cjson.null } })
    elseif dialect == "anthropic" then
        local request_id = ngx.var.request_id
        return cjson.encode({ type = "error",
                              error = { type = ANTHROPIC_TYPES[status] or "api_error", message = message },
                              request_id = request_id and ("req_" .. request_id) or nil })
    end
    return cjson.encode({ error = message })
end

-- The dialect of the request: its endpoint's, from the table (set by the access handler, or looked up by path in
-- the error locations, where ngx.ctx is empty and the access phase may not have run: limit_req, a 413 of nginx);
-- Ollama's native shape on every path the table does not name.
function _M.dialect()
    local dialect = ngx.ctx.herd_dialect
    if dialect then
        return dialect
    end
    local cfg = settings.cfg
    local entry = cfg and cfg.endpoints and endpoints.find(cfg.endpoints, ngx.var.uri)
    return entry and entry.dialect or "ollama"
end

-- Answer the request with `status` and `message` in the dialect of its endpoint (and Retry-After when given);
-- ends the request.
function _M.answer(status, message, retry_after)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json; charset=utf-8"
    if retry_after then
        ngx.header["Retry-After"] = tostring(retry_after)
    end
    ngx.say(_M.error_body(_M.dialect(), status, message))
    return ngx.exit(ngx.HTTP_OK)
end

-- The gateway's busy answer: gateway_busy_status, with `retry_after` (a pool's measured wait, stats.retry_after)
-- or gateway_retry_after.
function _M.busy(message, retry_after)
    local cfg = settings.cfg
    return _M.answer(cfg.busy_status, message, retry_after or cfg.retry_after)
end

return _M
