-- herd gateway: the fair wait queue of every pool (FIFO over every worker).
--
-- Owns: admit (wait for the head and a free slot, or answer busy: queue full, no live instance, timeout),
-- on_abort (a client that hangs up leaves the queue at once), waiting (requests in a pool's queue now).
-- A request takes a ticket; the ticket at the head competes for a slot (slots.acquire); tickets that left are
-- skipped; a ticket whose holder stops polling (its worker died) counts as gone.
-- Shared-dict keys (herd_gateway):
--   q:<pool>:t       read, written: the ticket counter
--   q:<pool>:h       read, written: the ticket at the head
--   q:<pool>:w       read, written: requests waiting
--   q:<pool>:l:<n>   read, written: ticket n is alive (refreshed while it polls)
--   q:<pool>:g:<n>   read, written, deleted: ticket n left the queue
--   q:<pool>:a:<n>   written: one worker moves the head past ticket n
-- It counts admitted, rejected_full, rejected_timeout, abandoned and affinity_* through stats.
local affinities = require("herd_gateway.affinity")
local keys = require("herd_gateway.keys")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local stats = require("herd_gateway.stats")

local _M = {}

local dict = keys.gateway

local function queue_leave(pool, ticket)
    dict():set("q:" .. pool .. ":g:" .. ticket, 1, 3600)
end

-- Move the head past tickets that left. Only one worker wins each step (add() of a short-lived marker), so
-- two workers never skip the same ticket twice.
local function advance_head(pool)
    local d = dict()
    for _ = 1, 1000 do
        local head = d:get("q:" .. pool .. ":h") or 1
        -- A ticket whose holder stopped polling (its worker died) counts as gone.
        local gone = d:get("q:" .. pool .. ":g:" .. head)
            or (head <= (d:get("q:" .. pool .. ":t") or 0) and not d:get("q:" .. pool .. ":l:" .. head))
        if not gone then
            return head
        end
        if d:add("q:" .. pool .. ":a:" .. head, 1, 10) then
            d:delete("q:" .. pool .. ":g:" .. head)
            d:incr("q:" .. pool .. ":h", 1, 1)
        else
            ngx.sleep(0.001)
        end
    end
    return d:get("q:" .. pool .. ":h") or 1
end

-- Pass the head on to the next ticket. Only the head's holder calls it (a ticket that leaves while not at
-- the head is marked gone instead), so a plain increment is enough.
local function pop_head(pool)
    dict():incr("q:" .. pool .. ":h", 1, 1)
end

-- Wait in the pool's FIFO until this request is at the head and a candidate has a free slot.
-- Returns the server with the slot taken, or answers 503 itself.
function _M.admit(pool, affinity)
    local d = dict()
    local preferred = affinity and affinity.preferred
    local ticket = d:incr("q:" .. pool .. ":t", 1, 0)
    local alive = "q:" .. pool .. ":l:" .. ticket
    d:set(alive, 1, 1)
    local ctx = ngx.ctx
    local start = ngx.now()
    local waiting = false
    local cfg = settings.cfg
    local deadline = start + cfg.queue_timeout

    local function leave(kind)
        d:delete(alive)
        if waiting then
            d:incr("q:" .. pool .. ":w", -1, 0)
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

    ctx.herd_leave = leave
    while true do
        d:set(alive, 1, 1)
        local head = advance_head(pool)
        -- head > ticket: this ticket was skipped as dead by mistake; it competes as if at the head.
        if head >= ticket then
            local server, any = slots.acquire(pool, nil, preferred)
            if server then
                d:delete(alive)
                if head == ticket then
                    pop_head(pool)
                end
                if waiting then
                    d:incr("q:" .. pool .. ":w", -1, 0)
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
            local n = d:incr("q:" .. pool .. ":w", 1, 0)
            waiting = true
            if n > cfg.queue_max then
                leave("rejected_full")
                ctx.herd_leave = nil
                return respond.busy("server busy, please try again.  maximum pending requests exceeded")
            end
        end
        ngx.update_time()
        local now = ngx.now()
        if now >= deadline then
            leave("rejected_timeout")
            ctx.herd_leave = nil
            return respond.busy("server busy, please try again: waited " .. cfg.queue_timeout .. "s for a free herd instance")
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
