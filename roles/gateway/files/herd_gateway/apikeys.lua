-- herd gateway: API keys.
--
-- Owns: the key record (/etc/nginx/herd/gateway-keys.json, mode 0600, rendered by role gateway: key names and
-- the sha1 of "herd-gateway-key:" + key, never the keys) and name(), the key name of a request's Authorization
-- header ("" when it names no key). The nginx config sets $herd_key_name from it (set_by_lua), so the log, the
-- rate and connection limits and the 401 checks see the name.
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
    local map = {}
    for _, entry in ipairs(record.keys) do
        if type(entry) ~= "table" or type(entry[1]) ~= "string" or type(entry[2]) ~= "string" then
            error("herd gateway: " .. path .. " holds a bad entry (deploy the gateway with site.yml)")
        end
        map[entry[1]] = entry[2]
    end
    digests = map
end

-- Whether requests need a key (a key record is loaded).
function _M.required()
    return digests ~= nil
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
