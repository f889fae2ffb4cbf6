-- herd gateway: the cluster catalogue: /api/tags, /v1/models and /api/ps answered for every live instance.
--
-- Owns: http_get (a raw HTTP/1.0 GET to an instance over a cosocket), gather (every live instance at once),
-- the merges (every model of the plan's pools once, the same text whichever instance answered first; ps with the
-- instance, and its address only with gateway_expose_upstream),
-- serve (content_by_lua of the catalogue paths, cached briefly so every worker gives the same answer; an API key
-- limited to some models sees only those, as if the others were absent).
-- One fan-out per cache lifetime per gateway, however many requests arrive (a site of hundreds of instances must
-- not be asked once per request): when the answer is no longer fresh, the one request that takes the refresh lock
-- asks every instance; the others meanwhile serve the answer before (kept STALE lifetimes), or wait for the
-- refresh when there is none (bounded by REFRESH_LIMIT).
-- Shared-dict keys (herd_gateway):
--   c:<path>     read, written, deleted: the cached answer of <path> (kept STALE x its lifetime)
--   c:<path>:f   read, written: the answer is fresh (catalogue_ttl; /api/ps 1 s)
--   c:<path>:l   written, deleted: one request refreshes the answer (add(), REFRESH_LIMIT)
local cjson = require("cjson.safe")
local endpoints = require("herd_gateway.endpoints")
local keys = require("herd_gateway.keys")
local names = require("herd_gateway.names")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")
local tenants = require("herd_gateway.tenants")

local _M = {}

-- How many lifetimes a cached answer may still be served while its refresh runs.
local STALE = 10
-- Longest refresh: connect (connect_timeout) and read (10 s) of the slowest instance, with a margin.
local REFRESH_LIMIT = 15

local function http_get(server, path)
    local sock = ngx.socket.tcp()
    sock:settimeouts(settings.cfg.connect_timeout * 1000, 10000, 10000)
    local ok, err = sock:connect(server.ip, server.port)
    if not ok then
        return nil, err
    end
    ok, err = sock:send("GET " .. path .. " HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
    if not ok then
        sock:close()
        return nil, err
    end
    local data
    data, err = sock:receive("*a")
    sock:close()
    if not data then
        return nil, err
    end
    local status = tonumber(data:match("^HTTP/%d%.%d (%d+)"))
    local body = data:match("\r\n\r\n(.*)$")
    if status ~= 200 or not body then
        return nil, "status " .. tostring(status)
    end
    return cjson.decode(body)
end

local function live_servers()
    local list = {}
    for _, server in ipairs(settings.cfg.servers) do
        if not server.down then
            list[#list + 1] = server
        end
    end
    return list
end

local function gather(path)
    local servers = live_servers()
    local threads = {}
    for index, server in ipairs(servers) do
        threads[index] = ngx.thread.spawn(http_get, server, path)
    end
    local results = {}
    for index, thread in ipairs(threads) do
        local ok, doc = ngx.thread.wait(thread)
        if ok and type(doc) == "table" then
            results[#results + 1] = { server = servers[index], doc = doc }
        end
    end
    return results
end

-- Every model of the plan's pools once (a model an instance still holds on disk but no pool serves is left out:
-- the gateway would answer 404 for it): of the instances' entries for one model, the smallest canonical text
-- (the same answer whichever instance answered first), in name order.
local function merge_unique(results, list_field, name_of)
    local best, found = {}, {}
    for _, r in ipairs(results) do
        for _, m in ipairs(type(r.doc[list_field]) == "table" and r.doc[list_field] or {}) do
            local key = type(m) == "table" and names.model_key(name_of(m))
            if key and settings.cfg.pools[key] then
                local text = respond.canonical(m)
                if not best[key] then
                    found[#found + 1] = key
                    best[key] = text
                elseif text < best[key] then
                    best[key] = text
                end
            end
        end
    end
    table.sort(found)
    local items = {}
    for index, key in ipairs(found) do
        items[index] = best[key]
    end
    return items
end

local function tag_name(m)
    return m.name or m.model
end

local function openai_name(m)
    return m.id
end

local function merge_tags(results)
    return respond.encode_list("models", merge_unique(results, "models", tag_name))
end

local function merge_openai(results)
    return respond.encode_list("data", merge_unique(results, "data", openai_name), '"object":"list",')
end

local function merge_ps(results)
    local models = {}
    for _, r in ipairs(results) do
        for _, m in ipairs(type(r.doc.models) == "table" and r.doc.models or {}) do
            local key = type(m) == "table" and names.model_key(m.name or m.model)
            if key and settings.cfg.pools[key] then
                m.herd_instance = r.server.key
                -- Backend addresses only with gateway_expose_upstream (loopback clients have /herd/pools).
                m.herd_endpoint = settings.cfg.expose_upstream and r.server.endpoint or nil
                models[#models + 1] = m
            end
        end
    end
    table.sort(models, function(a, b)
        if a.herd_instance ~= b.herd_instance then
            return a.herd_instance < b.herd_instance
        end
        return tostring(a.name) < tostring(b.name)
    end)
    return respond.encode_list("models", models)
end

local CATALOGUE = {
    ["/api/tags"] = { merge = merge_tags, ttl = "catalogue_ttl", list = "models", name_of = tag_name },
    ["/v1/models"] = { merge = merge_openai, ttl = "catalogue_ttl", list = "data", name_of = openai_name,
                       prefix = '"object":"list",' },
    ["/api/ps"] = { merge = merge_ps, ttl = 1, list = "models", name_of = tag_name },
}

-- The cluster's answer `text` of catalogue `entry` with only the models of the set `allowed`.
local function only(entry, text, allowed)
    local doc = cjson.decode(text)
    local items = {}
    for _, m in ipairs(type(doc) == "table" and type(doc[entry.list]) == "table" and doc[entry.list] or {}) do
        local key = type(m) == "table" and names.model_key(entry.name_of(m))
        if key and allowed[key] then
            items[#items + 1] = m
        end
    end
    return respond.encode_list(entry.list, items, entry.prefix)
end

-- Ask every live instance and merge; with a lifetime, store the answer (never evicting: without room it is
-- served uncached) or, when no instance answered, drop the one before. nil when no instance answered.
local function refresh(path, entry, ttl)
    local results = gather(path)
    local d = keys.gateway()
    if #results == 0 then
        d:delete("c:" .. path)
        return nil
    end
    local text = entry.merge(results)
    if ttl > 0 then
        d:safe_set("c:" .. path, text, ttl * STALE)
        d:safe_set("c:" .. path .. ":f", true, ttl)
    end
    return text
end

-- The answer of `path` to serve now: fresh from the cache; else refreshed by this request when it takes the
-- lock; else the one before while another request refreshes, or (none cached) the refreshed one once it is
-- there. nil when no instance answered.
local function current(path, entry, ttl)
    if ttl <= 0 then
        return refresh(path, entry, ttl)
    end
    local d = keys.gateway()
    local key, lock = "c:" .. path, "c:" .. path .. ":l"
    local cached = d:get(key)
    if cached and d:get(key .. ":f") then
        return cached
    end
    local deadline = ngx.now() + REFRESH_LIMIT
    while true do
        local ok, err = d:safe_add(lock, true, REFRESH_LIMIT)
        if ok then
            local text = refresh(path, entry, ttl)
            d:delete(lock)
            return text
        elseif err ~= "exists" then
            -- No room for the lock: this request asks the instances itself.
            return refresh(path, entry, 0) or cached
        end
        if cached then
            return cached
        end
        ngx.sleep(0.01)
        cached = d:get(key)
        if cached then
            return cached
        end
        ngx.update_time()
        if ngx.now() >= deadline then
            return nil
        end
    end
end

-- content_by_lua of /api/tags, /v1/models and /api/ps: the whole cluster's answer, cached briefly in the
-- shared dict so every worker gives the same one.
function _M.serve()
    local path = ngx.var.uri
    local entry = CATALOGUE[path]
    local allowed = endpoints.find(settings.cfg.endpoints, path)
    if not allowed then
        return respond.answer(404, "this path is not served by the herd gateway")
    end
    if not allowed.methods[ngx.req.get_method()] then
        return respond.answer(405, "method not allowed on " .. path)
    end
    local ttl = type(entry.ttl) == "number" and entry.ttl or settings.cfg[entry.ttl]
    local cached = current(path, entry, ttl)
    if not cached then
        ngx.var.herd_pool = endpoints.ANY
        return respond.answer(502, "no herd instance answered " .. path .. "; please try again")
    end
    local own = tenants.models(ngx.var.herd_key_name or "")
    if own then
        cached = only(entry, cached, own)
    end
    ngx.header["Content-Type"] = "application/json; charset=utf-8"
    ngx.say(cached)
end

return _M
