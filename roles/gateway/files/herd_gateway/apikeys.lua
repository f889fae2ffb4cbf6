-- herd gateway: API keys.
--
-- Owns: the key record (/etc/nginx/herd/gateway-keys.json, mode 0600, rendered by role gateway: key names, the
-- sha1 of "herd-gateway-key:" + key, never the keys, and each key's limits), name(), the key name of a request's
-- Authorization header ("" when it names no key), and limits(), the limits of a key name (models: the set of
-- pools it may use, or nil for every one; max_requests: in flight plus queued; tokens_per_minute; 0 = none;
-- weight: its share of a full pool against the other keys; batch: it waits behind every interactive key), and
-- tenants(), the tenants of the pools' queues (every key name, and "" for requests without a key).
-- The nginx config sets $herd_key_name from name() (set_by_lua), so the log, the rate and connection limits and
-- the 401 checks see the name.
-- Shared-dict keys: none.
--
-- A presented key is hashed and its digest looked up: the comparison is case-sensitive (an nginx map of strings
-- matched keys without regard to case) and its time does not depend on how much of a guess is right.
local cjson = require("cjson.safe")

local _M = {}

local PREFIX = "herd-gateway-key:"
-- Longest Authorization header looked at (a key is at most 256 characters).
local MAX_HEADER = 512

local digests -- hex digest -> key name; nil when the gateway has no keys
local limits = {} -- key name -> {models = set or nil, max_requests, tokens_per_minute, weight, batch}
local NO_LIMITS = { max_requests = 0, tokens_per_minute = 0, weight = 1, batch = false }
local tenants = { "" }

local function hex(bin)
    return (bin:gsub(".", function(c)
        return string.format("%02x", c:byte())
    end))
end

-- The digest role gateway writes for a key (filter gateway_key_digest).
function _M.digest(key)
    return hex(ngx.sha1_bin(PREFIX .. key))
end

-- init: read the key record (path "" or nil: no keys). A record that cannot be read stops the (re)load.
function _M.load(path)
    if path == nil or path == "" then
        digests = nil
        limits = {}
        tenants = { "" }
        return
    end
    local handle, err = io.open(path, "r")
    if not handle then
        error("herd gateway: cannot read the API keys " .. path .. ": " .. tostring(err))
    end
    local record = cjson.decode(handle:read("*a"))
    handle:close()
    if type(record) ~= "table" or type(record.keys) ~= "table" then
        error("herd gateway: " .. path .. " is not a key record (deploy the gateway with site.yml)")
    end
    local map, by_name, names = {}, {}, { "" }
    for _, entry in ipairs(record.keys) do
        local limit = type(entry) == "table" and (entry[3] or {}) or nil
        if type(entry) ~= "table" or type(entry[1]) ~= "string" or type(entry[2]) ~= "string"
            or type(limit) ~= "table" then
            error("herd gateway: " .. path .. " holds a bad entry (deploy the gateway with site.yml)")
        end
        map[entry[1]] = entry[2]
        local models
        if type(limit.models) == "table" then
            models = {}
            for _, model in ipairs(limit.models) do
                models[model] = true
            end
        end
        local weight = tonumber(limit.weight) or 1
        by_name[entry[2]] = { models = models, max_requests = tonumber(limit.max_requests) or 0,
                              tokens_per_minute = tonumber(limit.tokens_per_minute) or 0,
                              weight = weight > 0 and weight or 1, batch = limit.priority == "batch" }
        names[#names + 1] = entry[2]
    end
    digests = map
    limits = by_name
    tenants = names
end

-- Whether requests need a key (a key record is loaded).
function _M.required()
    return digests ~= nil
end

-- The limits of key name `name` (a table with max_requests and tokens_per_minute 0 for a name without limits).
function _M.limits(name)
    return limits[name] or NO_LIMITS
end

-- The tenants of the pools' queues: "" (requests without a key) and every key name.
function _M.tenants()
    return tenants
end

-- The key name of an Authorization header value, or "".
function _M.name(authorization)
    if not digests or type(authorization) ~= "string" or #authorization > MAX_HEADER then
        return ""
    end
    local scheme, token = authorization:match("^(%a+) +([^ ]+) *$")
    if not scheme or scheme:lower() ~= "bearer" then
        return ""
    end
    return digests[_M.digest(token)] or ""
end

return _M
