-- herd gateway: an instance's slots (max_conns over all its pools), its failures, and the choice of instance.
--
-- Owns: take / give_back (a slot, atomic over every worker), overflow (a retry's slot past max_conns),
-- candidates (least loaded first, backups last, equals in turn), acquire (a free slot on the preferred or least
-- loaded candidate), fail (count a failure), progress (the last upstream byte of an instance), drained
-- (apply_drained / sync_drained: the runtime drain flags every worker follows).
-- The in-flight count is a counters.add counter (a worker's share beside it, given back when the worker dies);
-- every write here is one that never evicts (counters.incr, safe_set): take answers the dict's error when full.
-- Shared-dict keys (herd_gateway):
--   i:<key>       read, written: requests in flight on instance <key> (and the worker's share w:<pid>:i:<key>)
--   f:<key>       read, written: failures of instance <key> within fail_timeout
--   r:<pool>      written: the pool's turn counter
--   t:<key>       read, written: time of instance <key>'s last upstream byte (or of the admission that found it idle)
--   d:<key>       read, written: instance <key> is drained
--   v:drained     read, written: version of the d: flags (a worker that has not seen it applies them)
local counters = require("herd_gateway.counters")
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
    counters.incr("f:" .. server.key, 1, settings.cfg.fail_timeout)
end

-- Take a slot on the server if it has one free (atomic over every worker). Returns true when taken, false when
-- the server is full, nil and the error when the dict is full. The first request on an idle instance starts its
-- progress clock (an instance is stalled by no byte since then).
local function take(server)
    local n, err = counters.add("i:" .. server.key, 1)
    if not n then
        return nil, err
    end
    if n <= server.max_conns then
        if n == 1 then
            dict():safe_set("t:" .. server.key, ngx.now())
        end
        return true
    end
    counters.add("i:" .. server.key, -1)
    return false
end

-- Give back the slot taken on the instance `key` (never below zero).
function _M.give_back(key)
    if key and key ~= "" then
        counters.add("i:" .. key, -1)
    end
end

-- Progress: body_filter_by_lua calls it with every chunk of an answer. At most one shared-dict write per
-- instance and worker a second (the guard judges stalls in tens of seconds).
local written = {}
function _M.progress(key)
    local now = ngx.now()
    if now - (written[key] or 0) >= 1 then
        written[key] = now
        dict():safe_set("t:" .. key, now)
    end
end

-- Seconds since the server's last upstream byte (or the admission that found it idle); nil when never seen.
function _M.progress_age(server)
    local at = dict():get("t:" .. server.key)
    return at and math.max(0, ngx.now() - at) or nil
end

-- Drained flags: `targets` ("host" or "host:id", from drained.json and gateway_drain) become the d: flags of
-- the servers they name, and every worker applies them before its next request (sync_drained). An unresolved
-- server stays down whatever the record says.
function _M.apply_drained(targets)
    local d = dict()
    local named = {}
    for _, target in ipairs(targets or {}) do
        named[tostring(target)] = true
    end
    local keys = {}
    for _, server in ipairs(settings.cfg.servers) do
        if named[server.key] or named[server.host] then
            local ok, err = d:safe_set("d:" .. server.key, 1)
            if not ok then
                ngx.log(ngx.ERR, "herd gateway: cannot drain ", server.key, ": ", err)
            end
            keys[#keys + 1] = server.key
        else
            d:delete("d:" .. server.key)
        end
    end
    counters.incr("v:drained", 1)
    return keys
end

local seen_version
-- Apply the d: flags to this worker's servers when they changed since it looked last (one dict read otherwise).
function _M.sync_drained()
    local d = dict()
    local version = d:get("v:drained")
    if version == seen_version then
        return
    end
    seen_version = version
    for _, server in ipairs(settings.cfg.servers) do
        server.drained = d:get("d:" .. server.key) ~= nil
        server.down = server.drained or server.ip == "0.0.0.0"
    end
end

-- Servers of a pool that may receive a request now, least loaded (in flight / weight) first, backups last;
-- equally loaded servers take turns (a rotating start, like nginx's least_conn falls back to round-robin).
function _M.candidates(pool, exclude)
    local list = {}
    local servers = settings.cfg.pools[pool] or {}
    local n = #servers
    local turn = n > 1 and (counters.incr("r:" .. pool, 1) or 0) or 0
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

-- Whether the server holds the pool's model.
local function in_pool(pool, server)
    for _, model in ipairs(server.models) do
        if model == pool then
            return true
        end
    end
    return false
end

-- A retry's slot when no candidate of the pool has one free: the least loaded candidate, past its max_conns
-- (counted like any slot, so nothing else is admitted there until it falls below). Only a retry overflows: its
-- request went to an instance that closed or refused it before any byte of an answer (restarted, as herd-guard
-- does to a hung one); it waits in this instance's own queue (OLLAMA_MAX_QUEUE) instead of failing.
function _M.overflow(pool, exclude)
    local entry = candidates(pool, exclude)[1]
    if not entry then
        return nil
    end
    local n = counters.add("i:" .. entry.server.key, 1)
    if not n then
        return nil  -- the dict is full: no slot can be counted, so none is taken
    end
    if n == 1 then
        dict():safe_set("t:" .. entry.server.key, ngx.now())
    end
    return entry.server
end

-- The least loaded candidate with a free slot and its load, found in one pass in turn order (no list built or
-- sorted), which stops at the first idle non-backup instance: nothing comes before it, so a pool with idle instances
-- costs a few dict reads whatever its size. Returns nil and whether any candidate exists at all.
local function least_loaded(servers, turn, exclude)
    local n = #servers
    local any = false
    local best, best_load
    for order = 0, n - 1 do
        local server = servers[(turn + order) % n + 1]
        if not server.down and not (exclude and exclude[server.key]) and not failed(server) then
            any = true
            local used = inflight(server)
            if used < server.max_conns then
                local load = used / server.weight
                if not best or (best.backup and not server.backup)
                    or (best.backup == server.backup and load < best_load) then
                    best, best_load = server, load
                    if load == 0 and not server.backup then
                        break
                    end
                end
            end
        end
    end
    return best, any, best_load
end

-- Whether a preferred entry may take the request: a live, non-backup member of the pool with a free slot and, unless
-- pinned (a session identifier), at most gateway_prefix_max_imbalance requests in flight more than it would hold at
-- the least loaded candidate's load (in flight per weight).
local function acceptable(pool, entry, exclude, best_load)
    local server = entry.server
    if server.down or server.backup or failed(server) or (exclude and exclude[server.key]) or not in_pool(pool, server) then
        return false
    end
    local used = inflight(server)
    if used >= server.max_conns then
        return false
    end
    -- At most prefix_max_imbalance requests more than the least loaded candidate's load gives this instance.
    return entry.pin or best_load == nil or used <= best_load * server.weight + settings.cfg.prefix_max_imbalance
end

-- Take a slot; returns the server, or nil and whether any candidate exists at all (and the dict's error when it is
-- full). `preferred` (cache affinity: affinity.plan's list of {server, pin, bytes}, or one server, pinned) is tried
-- first: the pinned one, then the longest cached prefix, the least loaded first among equals; an entry takes the
-- request when acceptable (above); affinity never goes past an instance's
-- max_conns (bounded load). Otherwise the least loaded candidate with a free slot takes it. Another worker may take
-- the slot first; then the next pass looks again.
-- The preferred entries in the order they are tried: the pinned one first, then the longest cached prefix, the
-- least loaded first among equals.
local function ranked(preferred)
    if #preferred < 2 then
        return preferred
    end
    local list = {}
    for index, entry in ipairs(preferred) do
        list[index] = { entry = entry, pin = entry.pin == true, bytes = entry.bytes or 0, index = index,
                        load = inflight(entry.server) / entry.server.weight }
    end
    table.sort(list, function(a, b)
        if a.pin ~= b.pin then
            return a.pin
        elseif a.bytes ~= b.bytes then
            return a.bytes > b.bytes
        elseif a.load ~= b.load then
            return a.load < b.load
        end
        return a.index < b.index
    end)
    local out = {}
    for index, item in ipairs(list) do
        out[index] = item.entry
    end
    return out
end

-- Delay scheduling: a slot only on the session's pinned instance or one that holds at least `min_bytes` of the
-- request's prompt (live, in the pool, a free slot; the imbalance bound does not apply: the request waits for its
-- cache instead of taking a slot elsewhere). Returns the server, or nil (and the dict's error when it is full).
function _M.acquire_local(pool, preferred, min_bytes)
    for _, entry in ipairs(ranked(preferred)) do
        if (entry.pin or (entry.bytes or 0) >= min_bytes) and acceptable(pool, { server = entry.server, pin = true }) then
            local taken, err = take(entry.server)
            if taken then
                return entry.server
            elseif err then
                return nil, err
            end
        end
    end
    return nil
end

function _M.acquire(pool, exclude, preferred)
    if preferred and preferred.key then
        preferred = { { server = preferred, pin = true } }
    elseif preferred then
        preferred = ranked(preferred)
    end
    local servers = settings.cfg.pools[pool] or {}
    local n = #servers
    local turn = n > 1 and (counters.incr("r:" .. pool, 1) or 0) or 0
    local any = false
    for _ = 1, 3 do
        local best, seen, best_load = least_loaded(servers, turn, exclude)
        any = any or seen
        if not best then
            return nil, any
        end
        for _, entry in ipairs(preferred or {}) do
            if acceptable(pool, entry, exclude, best_load) then
                local taken, err = take(entry.server)
                if taken then
                    return entry.server, true
                elseif err then
                    return nil, true, err
                end
            end
        end
        local taken, err = take(best)
        if taken then
            return best, true
        elseif err then
            return nil, true, err
        end
    end
    return nil, any
end

return _M
