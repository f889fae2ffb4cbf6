-- herd gateway: counters over every worker that heal when a worker dies, and writes that never evict.
--
-- Owns: incr (a counter created without eviction: safe_add, then incr), add (a counter over every worker with
-- this worker's share beside it: the slots' i:<key>, the queues' q:<pool>:w, the bodies' b:held), register
-- (init_worker: this worker's record, and a timer that reaps every second), reap (the shares of a dead worker
-- are taken off the counters, then dropped), free_space (capacity and free bytes of every shared dict).
-- A worker killed mid-request never runs its log phase: what it held stays in the counters. Its share says how
-- much that is, so the first live worker to reap after its death gives it back. A worker is dead when
-- /proc/<pid>/stat is gone, is a zombie, or shows another start time than its record (pid reuse); a worker
-- that exits gracefully (reload) stays alive until its last request is done, so its share is never taken.
-- Nothing written here evicts: a write that finds the dict full fails, and the caller answers 503.
-- Shared-dict keys (herd_gateway):
--   n:<pid>            written, read, deleted: worker <pid> is registered (the start time of /proc/<pid>/stat)
--   w:<pid>:<counter>  written, read, deleted: worker <pid>'s share of <counter> (i:<key>, q:<pool>:w, b:held)
--   k:reap             written: a worker reaps this second (add(), 1 s): the others skip
local keys = require("herd_gateway.keys")

local _M = {}

local dict = keys.gateway

-- The start time of process `pid` (field 22 of /proc/<pid>/stat), or nil when it is gone or a zombie.
local function start_time(pid)
    local handle = io.open("/proc/" .. pid .. "/stat", "r")
    if not handle then
        return nil
    end
    local text = handle:read("*l") or ""
    handle:close()
    -- The command name (field 2) may hold spaces and parentheses: count from the last ")".
    local rest = text:match("^.*%)%s+(.*)$")
    if not rest then
        return nil
    end
    local index = 2
    for field in rest:gmatch("%S+") do
        index = index + 1
        if index == 3 and field == "Z" then
            return nil
        elseif index == 22 then
            return field
        end
    end
    return nil
end
_M.start_time = start_time

-- Whether this host shows processes in /proc (without it nothing is ever reaped: no live worker is taken for dead).
local proc_seen = start_time("self") ~= nil

-- Add `delta` to `key` of dict `d` (default herd_gateway), creating it at 0 (with `ttl`) when missing, without
-- evicting anything. Returns the new value, or nil and the error ("no memory" when the dict is full).
function _M.incr(key, delta, ttl, d)
    d = d or dict()
    local value, err = d:incr(key, delta)
    if value or err ~= "not found" then
        return value, err
    end
    local ok, add_err = d:safe_add(key, 0, ttl)
    if not ok and add_err ~= "exists" then
        return nil, add_err
    end
    return d:incr(key, delta)
end
local incr = _M.incr

local registered = false

-- This worker's record n:<pid> (its start time), written before its first share.
local function register_self()
    if registered then
        return true
    end
    local pid = ngx.worker.pid()
    local ok, err = dict():safe_set("n:" .. pid, start_time(pid) or "")
    if not ok then
        return nil, err
    end
    registered = true
    return true
end

-- Add `delta` to the counter `counter` over every worker, and to this worker's share of it. Returns the
-- counter's new value, or nil and the error (the dict is full: nothing changed). A counter or share that would
-- go below zero stays at zero.
function _M.add(counter, delta)
    local ok, err = register_self()
    if not ok then
        return nil, err
    end
    local d = dict()
    local value
    value, err = incr(counter, delta, nil, d)
    if not value then
        return nil, err
    end
    local share, share_err = incr("w:" .. ngx.worker.pid() .. ":" .. counter, delta, nil, d)
    if not share then
        -- No room for the share: undo, so that the counter never holds what no share records.
        d:incr(counter, -delta)
        return nil, share_err
    end
    if share < 0 then
        d:incr("w:" .. ngx.worker.pid() .. ":" .. counter, -share)
    end
    if value < 0 then
        value = d:incr(counter, -value) or 0
    end
    return value
end

-- Whether worker `pid`, registered with start time `started` ("" or nil: unknown), is dead.
local function dead(pid, started)
    if not proc_seen then
        return false
    end
    local now = start_time(pid)
    return now == nil or (started ~= nil and started ~= "" and now ~= started)
end
_M.dead = dead

-- Take the shares of dead workers off their counters and drop their records. One worker a second does it
-- (`force`: now, whoever did last). Returns the number of dead workers and what their shares held in all.
function _M.reap(force)
    local d = dict()
    if not force and not d:safe_add("k:reap", 1, 1) then
        return 0, 0
    end
    local own = tostring(ngx.worker.pid())
    local found = d:get_keys(0)
    local verdict, workers, held = {}, 0, 0
    for _, key in ipairs(found) do
        local pid = key:match("^n:(%d+)$") or key:match("^w:(%d+):")
        if pid and pid ~= own and verdict[pid] == nil then
            verdict[pid] = dead(pid, d:get("n:" .. pid))
            if verdict[pid] then
                workers = workers + 1
            end
        end
    end
    if workers == 0 then
        return 0, 0
    end
    for _, key in ipairs(found) do
        local pid, counter = key:match("^w:(%d+):(.+)$")
        if pid and verdict[pid] then
            local share = d:get(key)
            if share and share ~= 0 then
                local value = d:incr(counter, -share)
                if value and value < 0 then
                    d:incr(counter, -value)
                end
                held = held + share
            end
            d:delete(key)
        end
    end
    for pid, is_dead in pairs(verdict) do
        if is_dead then
            d:delete("n:" .. pid)
            ngx.log(ngx.ERR, "herd gateway: worker ", pid, " died; its slots, queue places and body bytes (",
                held, " in all) are given back")
        end
    end
    return workers, held
end

-- init_worker_by_lua: record this worker and reap every second.
function _M.register()
    local ok, err = register_self()
    if not ok then
        ngx.log(ngx.ERR, "herd gateway: cannot record worker ", ngx.worker.pid(), ": ", err)
    end
    if not proc_seen then
        ngx.log(ngx.WARN, "herd gateway: /proc is not readable: counters of a worker that dies are not given back")
        return
    end
    local timer_ok, timer_err = ngx.timer.every(1, function(premature)
        if not premature then
            local reaped, reap_err = pcall(_M.reap)
            if not reaped then
                ngx.log(ngx.ERR, "herd gateway: reap: ", reap_err)
            end
        end
    end)
    if not timer_ok then
        ngx.log(ngx.ERR, "herd gateway: no reaping timer: ", timer_err)
    end
end

-- Capacity and free bytes of every shared dict of the gateway (ordered by name).
function _M.free_space()
    local out = {}
    for _, name in ipairs({ keys.AFFINITY, keys.GATEWAY, keys.QUEUE }) do
        local d = ngx.shared[name]
        if d then
            out[#out + 1] = { name = name, capacity = d:capacity(), free_space = d:free_space() }
        end
    end
    return out
end

return _M
