-- herd gateway: the counters of every pool that /herd/pools reports (herd-exporter turns them into metrics).
--
-- Owns: count (a counter), observe_wait (the queue-wait histogram), get and wait_seconds (reading them back).
-- Every write never evicts (counters.incr): a counter that finds the dict full is not counted.
-- Shared-dict keys (herd_gateway):
--   s:<pool>:<stat>   read, written: admitted, rejected_full, rejected_timeout, abandoned, affinity_hits,
--                     affinity_misses, affinity_new; the wait histogram b<n> (per bucket), count, sum_us
local counters = require("herd_gateway.counters")
local keys = require("herd_gateway.keys")

local _M = {}

local dict = keys.gateway

local BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 }
local BUCKET_LABELS = { "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30" }

-- Add `value` (default 1) to the pool's counter `name`.
function _M.count(pool, name, value)
    counters.incr("s:" .. pool .. ":" .. name, value or 1)
end

-- Record a request's wait in the pool's queue (seconds) in the histogram.
function _M.observe_wait(pool, wait)
    for index, bound in ipairs(BUCKETS) do
        if wait <= bound then
            counters.incr("s:" .. pool .. ":b" .. index, 1)
            break
        end
    end
    counters.incr("s:" .. pool .. ":count", 1)
    counters.incr("s:" .. pool .. ":sum_us", math.floor(wait * 1e6 + 0.5))
end

-- The pool's counter `name` (0 when never counted).
function _M.get(pool, name)
    return dict():get("s:" .. pool .. ":" .. name) or 0
end

-- The pool's wait histogram as /herd/pools reports it: cumulative buckets by upper bound, sum (s), count.
function _M.wait_seconds(pool)
    local buckets, running = {}, 0
    for index, label in ipairs(BUCKET_LABELS) do
        running = running + _M.get(pool, "b" .. index)
        buckets[label] = running
    end
    local count = _M.get(pool, "count")
    buckets["+Inf"] = count
    return { buckets = buckets, sum = _M.get(pool, "sum_us") / 1e6, count = count }
end

return _M
