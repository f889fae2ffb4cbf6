-- herd gateway: an instance's slots (max_conns over all its pools), its failures, and the choice of instance.
--
-- Owns: take / give_back (a slot, atomic over every worker), candidates (least loaded first, backups last,
-- equals in turn), acquire (a free slot on the preferred or least loaded candidate), fail (count a failure).
-- Shared-dict keys (herd_gateway):
--   i:<key>    read, written: requests in flight on instance <key>
--   f:<key>    read, written: failures of instance <key> within fail_timeout
--   r:<pool>   written: the pool's turn counter
local keys = require("herd_gateway.keys")
local settings = require("herd_gateway.settings")

local _M = {}

local dict = keys.gateway

-- Requests in flight on the server now.
function _M.inflight(server)
    return dict():get("i:" .. server.key) or 0
end
local inflight = _M.inflight

-- Whether the server failed max_fails times within fail_timeout.
function _M.failed(server)
    return (dict():get("f:" .. server.key) or 0) >= settings.cfg.max_fails
end
local failed = _M.failed

-- Count a failure of the server (it answered nothing); it expires after fail_timeout.
function _M.fail(server)
    dict():incr("f:" .. server.key, 1, 0, settings.cfg.fail_timeout)
end

-- Take a slot on the server if it has one free (atomic over every worker). Returns true when taken.
local function take(server)
    local d = dict()
    local n = d:incr("i:" .. server.key, 1, 0)
    if n and n <= server.max_conns then
        return true
    end
    d:incr("i:" .. server.key, -1, 0)
    return false
end

-- Give back the slot taken on the instance `key` (never below zero).
function _M.give_back(key)
    if key and key ~= "" then
        local n = dict():incr("i:" .. key, -1, 0)
        if n and n < 0 then
            dict():set("i:" .. key, 0)
        end
    end
end

-- Servers of a pool that may receive a request now, least loaded (in flight / weight) first, backups last;
-- equally loaded servers take turns (a rotating start, like nginx's least_conn falls back to round-robin).
function _M.candidates(pool, exclude)
    local list = {}
    local servers = settings.cfg.pools[pool] or {}
    local n = #servers
    local turn = n > 1 and (dict():incr("r:" .. pool, 1, 0) or 0) or 0
    for index, server in ipairs(servers) do
        if not server.down and not failed(server) and not (exclude and exclude[server.key]) then
            list[#list + 1] = { server = server, load = inflight(server) / server.weight,
                                order = (index - 1 - turn) % n }
        end
    end
    table.sort(list, function(a, b)
        if a.server.backup ~= b.server.backup then
            return not a.server.backup
        end
        if a.load ~= b.load then
            return a.load < b.load
        end
        return a.order < b.order
    end)
    return list
end
local candidates = _M.candidates

local function in_pool(pool, server)
    for _, member in ipairs(settings.cfg.pools[pool] or {}) do
        if member == server then
            return true
        end
    end
    return false
end

-- Take a slot on the least loaded candidate with one free; returns the server, or nil and whether any
-- candidate exists at all. `preferred` (conversation affinity) is taken first when it is a live, non-backup
-- member of the pool with a free slot: affinity never goes past an instance's max_conns (bounded load).
function _M.acquire(pool, exclude, preferred)
    if preferred and not preferred.down and not preferred.backup and not failed(preferred)
        and not (exclude and exclude[preferred.key]) and in_pool(pool, preferred) and take(preferred) then
        return preferred, true
    end
    local list = candidates(pool, exclude)
    for _, entry in ipairs(list) do
        if take(entry.server) then
            return entry.server, true
        end
    end
    return nil, #list > 0
end

return _M
