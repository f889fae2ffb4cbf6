-- herd gateway: the fair wait queue of every pool (FIFO over every worker).
--
-- Owns: admit (wait for the head and a free slot, or answer busy: queue full, no live instance, timeout),
-- on_abort (a client that hangs up leaves the queue at once), waiting (requests in a pool's queue now).
-- A request takes a ticket; the ticket at the head competes for a slot (slots.acquire); tickets that left are
-- skipped; a ticket whose holder stops polling (its worker died) counts as gone, and the waiting count is a
-- counters.add counter (a dead worker's share is given back).
-- Every write never evicts: the ticket counter, head and waiting count in herd_gateway (counters), the
-- per-request markers in their own dict herd_queue (safe_set, safe_add). When either dict is full the request is
-- answered 503 (Ollama's error shape) and leaves the queue as if it had timed out: no state is left half-written.
-- Shared-dict keys (herd_gateway):
--   q:<pool>:t       read, written: the ticket counter
--   q:<pool>:h       read, written: the ticket at the head
--   q:<pool>:w       read, written: requests waiting (and the worker's share w:<pid>:q:<pool>:w)
-- Shared-dict keys (herd_queue):
--   q:<pool>:l:<n>   read, written: ticket n is alive (refreshed while it polls)
--   q:<pool>:g:<n>   read, written, deleted: ticket n left the queue
--   q:<pool>:a:<n>   written: one worker moves the head past ticket n
-- It counts admitted, rejected_full, rejected_timeout, abandoned and affinity_* through stats.
local affinities = require("herd_gateway.affinity")
local counters = require("herd_gateway.counters")
local keys = require("herd_gateway.keys")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local stats = require("herd_gateway.stats")

local _M = {}

local dict = keys.gateway
local markers = keys.queue

-- The answer when a dict is full: the request leaves, nothing is left half-written.
local FULL = "server busy, please try again: the gateway's shared state is full"

-- Mark the ticket gone. Without room for the mark it is gone all the same: its alive marker is deleted, and a
-- ticket at or behind the head without one counts as gone.
local function queue_leave(pool, ticket)
    local ok, err = markers():safe_set("q:" .. pool .. ":g:" .. ticket, 1, 3600)
    if not ok then
        ngx.log(ngx.WARN, "herd gateway: queue ", pool, ": ticket ", ticket, " left unmarked: ", err)
    end
end

-- Move the head past tickets that left. Only one worker wins each step (add() of a short-lived marker), so
-- two workers never skip the same ticket twice. Returns the head, or nil and the error when herd_queue is full.
local function advance_head(pool)
    local d, m = dict(), markers()
    for _ = 1, 1000 do
        local head = d:get("q:" .. pool .. ":h") or 1
        -- A ticket whose holder stopped polling (its worker died) counts as gone.
        local gone = m:get("q:" .. pool .. ":g:" .. head)
            or (head <= (d:get("q:" .. pool .. ":t") or 0) and not m:get("q:" .. pool .. ":l:" .. head))
        if not gone then
            return head
        end
        local ok, err = m:safe_add("q:" .. pool .. ":a:" .. head, 1, 10)
        if ok then
            m:delete("q:" .. pool .. ":g:" .. head)
            counters.incr("q:" .. pool .. ":h", 1, nil, d)
        elseif err ~= "exists" then
            return nil, err
        else
            ngx.sleep(0.001)
        end
    end
    return d:get("q:" .. pool .. ":h") or 1
end

-- Pass the head on to the next ticket. Only the head's holder calls it (a ticket that leaves while not at
-- the head is marked gone instead), so a plain increment is enough.
local function pop_head(pool)
    counters.incr("q:" .. pool .. ":h", 1)
end

-- Wait in the pool's FIFO until this request is at the head and a candidate has a free slot.
-- Returns the server with the slot taken, or answers 503 itself.
function _M.admit(pool, affinity)
    local d, m = dict(), markers()
    local preferred = affinity and affinity.preferred
    local ticket, err = counters.incr("q:" .. pool .. ":t", 1, nil, d)
    if not ticket then
        ngx.log(ngx.ERR, "herd gateway: queue ", pool, ": no ticket: ", err)
        stats.count(pool, "rejected_full")
        return respond.answer(503, FULL, settings.cfg.retry_after)
    end
    local alive = "q:" .. pool .. ":l:" .. ticket
    local ctx = ngx.ctx
    local start = ngx.now()
    local waiting = false
    local cfg = settings.cfg
    local deadline = start + cfg.queue_timeout

    local function leave(kind)
        m:delete(alive)
        if waiting then
            counters.add("q:" .. pool .. ":w", -1)
            waiting = false
        end
        local head = d:get("q:" .. pool .. ":h") or 1
        if head == ticket then
            pop_head(pool)
        else
            queue_leave(pool, ticket)
        end
        if kind then
            stats.count(pool, kind)
        end
    end

    -- The dict is full: leave (counted rejected_full) and answer 503 with what filled up.
    local function full(what)
        ngx.log(ngx.ERR, "herd gateway: queue ", pool, ": ", what)
        leave("rejected_full")
        ctx.herd_leave = nil
        return respond.answer(503, FULL, cfg.retry_after)
    end

    ctx.herd_leave = leave
    while true do
        local ok, set_err = m:safe_set(alive, 1, 1)
        if not ok then
            return full("herd_queue: " .. tostring(set_err))
        end
        local head, head_err = advance_head(pool)
        if not head then
            return full("herd_queue: " .. tostring(head_err))
        end
        -- head > ticket: this ticket was skipped as dead by mistake; it competes as if at the head.
        if head >= ticket then
            local server, any, slot_err = slots.acquire(pool, nil, preferred)
            if slot_err then
                return full("herd_gateway: " .. tostring(slot_err))
            end
            if server then
                m:delete(alive)
                if head == ticket then
                    pop_head(pool)
                end
                if waiting then
                    counters.add("q:" .. pool .. ":w", -1)
                    waiting = false
                end
                ctx.herd_leave = nil
                local wait = ngx.now() - start
                stats.count(pool, "admitted")
                stats.observe_wait(pool, wait)
                if affinity then
                    stats.count(pool, not preferred and "affinity_new" or server == preferred and "affinity_hits"
                        or "affinity_misses")
                    affinities.remember(affinity.key, server)
                end
                return server
            end
            if not any then
                leave("rejected_full")
                ctx.herd_leave = nil
                return respond.busy("server busy, please try again: no herd instance serving this model is available")
            end
        end
        if not waiting then
            local n, wait_err = counters.add("q:" .. pool .. ":w", 1)
            if not n then
                return full("herd_gateway: " .. tostring(wait_err))
            end
            waiting = true
            if n > cfg.queue_max then
                leave("rejected_full")
                ctx.herd_leave = nil
                return respond.busy("server busy, please try again.  maximum pending requests exceeded",
                    stats.retry_after(pool))
            end
        end
        ngx.update_time()
        local now = ngx.now()
        if now >= deadline then
            leave("rejected_timeout")
            ctx.herd_leave = nil
            return respond.busy("server busy, please try again: waited " .. cfg.queue_timeout
                .. "s for a free herd instance", stats.retry_after(pool))
        end
        local position = math.max(0, ticket - head)
        ngx.sleep(math.min(0.002 + 0.001 * position, 0.02, deadline - now))
    end
end

-- ngx.on_abort handler of a request in the queue: it leaves (counted abandoned), then ends with 499.
function _M.on_abort()
    local leave = ngx.ctx.herd_leave
    if leave then
        ngx.ctx.herd_leave = nil
        leave("abandoned")
    end
    return ngx.exit(499)
end

-- Requests waiting in the pool's queue now.
function _M.waiting(pool)
    return math.max(0, dict():get("q:" .. pool .. ":w") or 0)
end

return _M
