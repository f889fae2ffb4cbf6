-- herd gateway: the wait queue of every pool: fair share between API keys, FIFO within one key.
--
-- Owns: admit (wait for this key's turn and a free slot, or answer busy: queue full, no live instance, timeout),
-- on_abort (a client that hangs up leaves the queue at once), waiting (requests in a pool's queue now), done (log
-- phase: the slot the request's tenant held is given back to its share).
-- Every tenant (an API key name; "" = every request without a key, one shared tenant) has a FIFO of its own in
-- each pool: a request takes a ticket there; the ticket at the head of a tenant's FIFO is the tenant's candidate;
-- tickets that left are skipped; a ticket whose holder stops polling (its worker died) counts as gone.
-- Which candidate takes the next free slot (the turn): the lowest class first (interactive 0; batch 1 until it
-- has waited gateway_batch_aging, then 0), then the lowest share (slots of the pool the tenant holds now, divided
-- by its weight), then the longest wait. That is weighted max-min fairness of the pool's slots, served the way
-- Dominant Resource Fairness serves one resource (Ghodsi et al., NSDI 2011: the next unit goes to the user of the
-- lowest share); a tenant alone, or the only one waiting, takes every free slot. Candidates publish their class and
-- arrival (herd_queue m:, 1 s, refreshed while they poll); a turn reads the candidates of every tenant that may use
-- the pool: O(keys) dict reads per poll of each candidate, and only while the pool is full.
-- Anticipation: a client that sends one request at a time (an agent's loop) is idle between its answer and its
-- next request for a few milliseconds, and a work-conserving scheduler would hand its slot to another key in that
-- gap ("deceptive idleness": Iyer and Druschel, "Anticipatory scheduling", SOSP 2001). So when a request of a key
-- ends and the key has no candidate waiting, it stays a candidate for gateway_fair_share_anticipation (herd_queue
-- a:, arrival = the end): a key of a higher share waits that long at most before it may take the slot.
-- Every write never evicts: the ticket counters, heads, waiting and held counts in herd_gateway (counters), the
-- per-request markers in their own dict herd_queue (safe_set, safe_add). When either dict is full the request is
-- answered 503 (Ollama's error shape) and leaves the queue as if it had timed out: no state is left half-written.
-- Shared-dict keys (herd_gateway); <fifo> is <pool>|<tenant>:
--   q:<fifo>:t       read, written: the tenant's ticket counter in the pool
--   q:<fifo>:h       read, written: the ticket at the head of the tenant's FIFO
--   q:<pool>:w       read, written: requests waiting in the pool (and the worker's share w:<pid>:q:<pool>:w)
--   o:<fifo>         read, written: slots of the pool the tenant holds (counters.add)
-- Shared-dict keys (herd_queue):
--   q:<fifo>:l:<n>   read, written: ticket n is alive (refreshed while it polls)
--   q:<fifo>:g:<n>   read, written, deleted: ticket n left the queue
--   q:<fifo>:a:<n>   written: one worker moves the head past ticket n
--   m:<fifo>         read, written, deleted: the tenant's candidate, "<class> <arrival>" (1 s, refreshed)
--   a:<fifo>         read, written, deleted: the tenant's anticipated candidate after its request ended (anticipation)
-- It counts admitted, rejected_full, rejected_timeout, abandoned and affinity_* through stats.
local affinities = require("herd_gateway.affinity")
local apikeys = require("herd_gateway.apikeys")
local counters = require("herd_gateway.counters")
local keys = require("herd_gateway.keys")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local stats = require("herd_gateway.stats")

local _M = {}

local dict = keys.gateway
local markers = keys.queue

-- How often a request waiting in its queue plans again (cache affinity: where its prompt is cached changes).
local REPLAN = 0.1
-- The answer when a dict is full: the request leaves, nothing is left half-written.
local FULL = "server busy, please try again: the gateway's shared state is full"

-- Mark the ticket gone. Without room for the mark it is gone all the same: its alive marker is deleted, and a
-- ticket at or behind the head without one counts as gone.
local function queue_leave(fifo, ticket)
    local ok, err = markers():safe_set("q:" .. fifo .. ":g:" .. ticket, 1, 3600)
    if not ok then
        ngx.log(ngx.WARN, "herd gateway: queue ", fifo, ": ticket ", ticket, " left unmarked: ", err)
    end
end

-- Move the head past tickets that left. Only one worker wins each step (add() of a short-lived marker), so
-- two workers never skip the same ticket twice. Returns the head, or nil and the error when herd_queue is full.
local function advance_head(fifo)
    local d, m = dict(), markers()
    for _ = 1, 1000 do
        local head = d:get("q:" .. fifo .. ":h") or 1
        -- A ticket whose holder stopped polling (its worker died) counts as gone.
        local gone = m:get("q:" .. fifo .. ":g:" .. head)
            or (head <= (d:get("q:" .. fifo .. ":t") or 0) and not m:get("q:" .. fifo .. ":l:" .. head))
        if not gone then
            return head
        end
        local ok, err = m:safe_add("q:" .. fifo .. ":a:" .. head, 1, 10)
        if ok then
            m:delete("q:" .. fifo .. ":g:" .. head)
            counters.incr("q:" .. fifo .. ":h", 1, nil, d)
        elseif err ~= "exists" then
            return nil, err
        else
            ngx.sleep(0.001)
        end
    end
    return d:get("q:" .. fifo .. ":h") or 1
end

-- Pass the head on to the next ticket. Only the head's holder calls it (a ticket that leaves while not at
-- the head is marked gone instead), so a plain increment is enough.
local function pop_head(fifo)
    counters.incr("q:" .. fifo .. ":h", 1)
end

-- The candidate of a FIFO, or its anticipated one: "<class> <arrival>".
local function candidate(fifo)
    local m = markers()
    local value = m:get("m:" .. fifo) or m:get("a:" .. fifo)
    if not value then
        return nil
    end
    local class, since = value:match("^(%d) (%S+)$")
    return tonumber(class), tonumber(since)
end

-- Whether the tenant `me` (its candidate of class `class` that arrived at `since`) has the pool's turn: no other
-- tenant's candidate of a lower class, or of the same class and a lower share, or of the same share and an earlier
-- arrival.
local function my_turn(pool, me, class, since)
    local tenants = apikeys.tenants()
    if #tenants < 2 then
        return true
    end
    local d = dict()
    local mine = pool .. "|" .. me
    local share = (d:get("o:" .. mine) or 0) / apikeys.limits(me).weight
    for _, other in ipairs(tenants) do
        if other ~= me then
            local fifo = pool .. "|" .. other
            local other_class, other_since = candidate(fifo)
            if other_class and other_class <= class then
                if other_class < class then
                    return false
                end
                local other_share = (d:get("o:" .. fifo) or 0) / apikeys.limits(other).weight
                if other_share < share or (other_share == share and other_since < since) then
                    return false
                end
            end
        end
    end
    return true
end

-- Wait in the tenant's FIFO of the pool until this request is its tenant's candidate, the tenant has the pool's
-- turn and an instance has a free slot. `tenant` is the API key name ("" for none). Returns the server with the
-- slot taken, or answers 503 itself.
function _M.admit(pool, affinity, tenant)
    local cfg = settings.cfg
    -- gateway_fair_share false: one FIFO per pool, every key alike.
    tenant = cfg.fair_share and tenant or ""
    local d, m = dict(), markers()
    local fifo = pool .. "|" .. tenant
    -- A burst of one agent's new sessions: one waits for the first one's answer to end (affinity.await), before it
    -- takes a ticket, so it holds no one up; then its plan is made again.
    if affinity and affinity.pending and affinities.await(affinity) then
        stats.count(pool, "prefix_waits")
    end
    local preferred = affinity and affinity.preferred or {}
    local ticket, err = counters.incr("q:" .. fifo .. ":t", 1, nil, d)
    if not ticket then
        ngx.log(ngx.ERR, "herd gateway: queue ", fifo, ": no ticket: ", err)
        stats.count(pool, "rejected_full")
        return respond.answer(503, FULL, settings.cfg.retry_after)
    end
    local alive = "q:" .. fifo .. ":l:" .. ticket
    local ctx = ngx.ctx
    local start = ngx.now()
    local waiting = false
    local deadline = start + cfg.queue_timeout
    local batch = apikeys.limits(tenant).batch
    local aged = start + (cfg.batch_aging or 0)
    -- Delay scheduling (prefix routing): a request whose prompt is cached on an instance (a block or more) waits for
    -- a slot there, rather than take one elsewhere, for as long as that cache saves: the cached bytes over
    -- gateway_prefix_prefill_rate, at most gateway_prefix_max_wait. Meanwhile it takes a slot of its cached instance
    -- as soon as one frees, even before the head of its FIFO, while the head has waited less than
    -- gateway_prefix_max_wait (Zaharia et al., "Delay scheduling", EuroSys 2010): so the slot that frees on an
    -- instance goes to a request that has its prompt there, and no request waits longer than that bound for it.
    local local_until = 0
    local function delay_bound()
        local_until = 0
        if cfg.affinity == "prefix" and (cfg.prefix_max_wait or 0) > 0 then
            local cached = 0
            for _, entry in ipairs(preferred) do
                if not entry.pin and (entry.bytes or 0) > cached then
                    cached = entry.bytes
                end
            end
            if cached >= cfg.prefix_block_bytes then
                local_until = start + math.min(cfg.prefix_max_wait, cached / cfg.prefix_prefill_rate)
            end
        end
    end
    delay_bound()
    local planned = start

    -- The tenant's candidate marker goes when its FIFO is empty behind this ticket.
    local function drop_candidate()
        if (d:get("q:" .. fifo .. ":t") or 0) <= ticket then
            m:delete("m:" .. fifo)
        end
    end

    local function leave(kind)
        m:delete(alive)
        if waiting then
            counters.add("q:" .. pool .. ":w", -1)
            waiting = false
        end
        local head = d:get("q:" .. fifo .. ":h") or 1
        if head == ticket then
            drop_candidate()
            pop_head(fifo)
        else
            queue_leave(fifo, ticket)
        end
        if kind then
            stats.count(pool, kind)
        end
    end

    -- The dict is full: leave (counted rejected_full) and answer 503 with what filled up.
    local function full(what)
        ngx.log(ngx.ERR, "herd gateway: queue ", fifo, ": ", what)
        leave("rejected_full")
        ctx.herd_leave = nil
        return respond.answer(503, FULL, cfg.retry_after)
    end

    -- The slot on `server` is taken: leave the FIFO (at its head, or passing it), count, remember. Returns the server,
    -- or answers 503 when the dict is full.
    local function admitted(server, head)
        local held, held_err = counters.add("o:" .. fifo, 1)
        if not held then
            slots.give_back(server.key)
            return full("herd_gateway: " .. tostring(held_err))
        end
        ctx.herd_held = fifo
        m:delete(alive)
        m:delete("a:" .. fifo)
        if head == ticket then
            drop_candidate()
            pop_head(fifo)
        elseif head < ticket then
            queue_leave(fifo, ticket)  -- it passed the head: the head skips its ticket later
        end
        if waiting then
            counters.add("q:" .. pool .. ":w", -1)
            waiting = false
        end
        ctx.herd_leave = nil
        local wait = ngx.now() - start
        stats.count(pool, "admitted")
        stats.observe_wait(pool, wait)
        ngx.var.herd_queue_wait = string.format("%.3f", wait)
        if affinity then
            local matched = affinities.matched(affinity, server)
            stats.count(pool, #preferred == 0 and "affinity_new"
                or (matched > 0 or server == preferred[1].server) and "affinity_hits" or "affinity_misses")
            stats.observe_prefix(pool, affinity.bytes and matched or nil)
            ctx.herd_pending = affinities.mark(affinity, server)
            -- recorded when the instance's first byte comes back (herd_gateway.body_filter; a marked request when its
            -- answer ends, herd_gateway.log), not now
        end
        return server
    end

    -- Delay scheduling's take: a slot on the cached instance only. Returns the server admitted, or nil and whether
    -- the request was answered (503: the dict is full); nil, nil: no slot there now.
    local function take_local(head)
        local server, slot_err = slots.acquire_local(pool, preferred, cfg.prefix_block_bytes)
        if slot_err then
            return nil, full("herd_gateway: " .. tostring(slot_err)) or true
        end
        if server then
            return admitted(server, head)
        end
        return nil, nil
    end

    ctx.herd_leave = leave
    while true do
        -- A request that waits plans again every REPLAN seconds: the records it was planned on change meanwhile
        -- (an instance records its prompt when an answer that carried it ends there; slots and host caches move on).
        if affinity and affinity.chain and ngx.now() - planned >= REPLAN then
            planned = ngx.now()
            affinities.refresh(affinity)
            preferred = affinity.preferred
            delay_bound()
        end
        local ok, set_err = m:safe_set(alive, 1, 1)
        if not ok then
            return full("herd_queue: " .. tostring(set_err))
        end
        local head, head_err = advance_head(fifo)
        if not head then
            return full("herd_queue: " .. tostring(head_err))
        end
        -- head > ticket: this ticket was skipped as dead by mistake; it competes as if at the head.
        if head >= ticket then
            local class = (batch and ngx.now() < aged) and 1 or 0
            ok, set_err = m:safe_set("m:" .. fifo, class .. " " .. start, 1)
            if not ok then
                return full("herd_queue: " .. tostring(set_err))
            end
            if my_turn(pool, tenant, class, start) then
                if ngx.now() < local_until then
                    local server, answered = take_local(head)
                    if server or answered then
                        return server
                    end
                else
                    local server, any, slot_err = slots.acquire(pool, nil, preferred)
                    if slot_err then
                        return full("herd_gateway: " .. tostring(slot_err))
                    end
                    if server then
                        return admitted(server, head)
                    end
                    if not any then
                        leave("rejected_full")
                        ctx.herd_leave = nil
                        return respond.busy("server busy, please try again: no herd instance serving this model is available")
                    end
                end
            end
        elseif ngx.now() < local_until then
            -- Behind the head: a slot that frees on this request's cached instance is its, while the head has waited
            -- less than gateway_prefix_max_wait (and the tenant has the pool's turn).
            local _, head_since = candidate(fifo)
            if head_since and ngx.now() - head_since < cfg.prefix_max_wait
                and my_turn(pool, tenant, (batch and ngx.now() < aged) and 1 or 0, start) then
                local server, answered = take_local(head)
                if server or answered then
                    return server
                end
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

-- log phase: the slot the request held goes back to its tenant's share; with other keys and no candidate of its
-- own waiting, the tenant stays a candidate for the anticipation (its next request may be on its way).
function _M.done(ctx)
    local fifo = ctx.herd_held
    if not fifo then
        return
    end
    ctx.herd_held = nil
    counters.add("o:" .. fifo, -1)
    local cfg = settings.cfg
    local m = markers()
    if cfg.fair_share and (cfg.anticipation or 0) > 0 and #apikeys.tenants() > 1 and not m:get("m:" .. fifo) then
        local tenant = fifo:match("|(.*)$") or ""
        m:safe_set("a:" .. fifo, (apikeys.limits(tenant).batch and 1 or 0) .. " " .. ngx.now(), cfg.anticipation)
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
