-- herd gateway: the limits of each API key (gateway_api_keys: models, max_requests, tokens_per_minute).
--
-- Owns: models and may_use (a model outside a key's `models` is absent for that key: route answers 404 as for any
-- unknown model, the catalogue leaves it out), admit (before the queue: over max_requests in flight plus queued, or over tokens_per_minute in the
-- last 60 s, the request is answered 429 with Retry-After, in its endpoint's dialect) and done (log phase: the
-- request's place is given back and its tokens counted against the key's window).
-- Requests without a key (no gateway_api_keys) have no per-key limits: gateway_rate_limit and gateway_limit_conn
-- still apply per client address.
-- The tokens of a request count when it ends (the instance reports them last): a key under its limit may start
-- several long answers at once and overshoot by what they produce; the next request after is refused until the
-- window (usage.spent: this and the last minute, weighted) is back under the limit.
-- Shared-dict keys (herd_gateway):
--   e:<key>  read, written: requests of API key <key> in flight or queued (counters.add: a dead worker's share is
--            given back)
local apikeys = require("herd_gateway.apikeys")
local counters = require("herd_gateway.counters")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")
local usage = require("herd_gateway.usage")

local _M = {}

-- The set of pools API key `key` ("" for none) may use, or nil for every one.
function _M.models(key)
    return key ~= "" and apikeys.limits(key).models or nil
end

-- Whether API key `key` ("" for none) may use the pool `pool`.
function _M.may_use(key, pool)
    local models = key ~= "" and apikeys.limits(key).models
    return not models or models[pool] == true
end

-- Before the queue: true when the request may wait for a slot, else it has been answered (429, or 503 when the
-- shared dict is full).
function _M.admit(key)
    if key == "" then
        return true
    end
    local limits = apikeys.limits(key)
    local per_minute = limits.tokens_per_minute
    if per_minute > 0 and usage.spent(key) >= per_minute then
        -- The window slides: after the rest of this minute the last one weighs nothing.
        local retry = math.max(1, math.ceil(60 - ngx.now() % 60))
        respond.answer(429, "rate limit: API key " .. key .. " used its " .. per_minute
            .. " tokens per minute, please try again later", retry)
        return false
    end
    if limits.max_requests > 0 then
        local held, err = counters.add("e:" .. key, 1)
        if not held then
            ngx.log(ngx.ERR, "herd gateway: herd_gateway: ", err)
            respond.answer(503, "server busy, please try again: the gateway's shared state is full",
                settings.cfg.retry_after)
            return false
        end
        if held > limits.max_requests then
            counters.add("e:" .. key, -1)
            respond.answer(429, "rate limit: API key " .. key .. " has " .. limits.max_requests
                .. " requests in flight or queued, please try again later", settings.cfg.retry_after)
            return false
        end
        ngx.ctx.herd_tenant = key
    end
    return true
end

-- log phase: give the request's place back; count `tokens` (the answer's, or nil) against its key's window.
function _M.done(ctx, tokens)
    local held = ctx.herd_tenant
    if held then
        ctx.herd_tenant = nil
        counters.add("e:" .. held, -1)
    end
    local key = ngx.var.herd_key_name or ""
    if tokens and key ~= "" and apikeys.limits(key).tokens_per_minute > 0 then
        usage.add(key, tokens)
    end
end

return _M
