-- herd gateway: the counters of every pool that /herd/pools reports (herd-exporter turns them into metrics).
--
-- Owns: count (a counter), observe_wait (the queue-wait histogram and its moving average), get and wait_seconds
-- (reading them back), retry_after (the Retry-After of a pool's busy answers, from its measured wait).
-- Every write never evicts (counters.incr): a counter that finds the dict full is not counted.
-- Shared-dict keys (herd_gateway):
--   s:<pool>:<stat>   read, written: admitted, rejected_full, rejected_timeout, abandoned, affinity_hits,
--                     affinity_misses, affinity_new, prefix_waits; the wait histogram b<n> (per bucket), count,
--                     sum_us;
--                     wait_avg_us (moving average of the last waits, safe_set: lossy between workers, never evicts);
--                     the prefix-hit histogram p<n> (per bucket), pcount, psum (prompt bytes found cached)
local counters = require("herd_gateway.counters")
local keys = require("herd_gateway.keys")
local settings = require("herd_gateway.settings")

local _M = {}

local dict = keys.gateway

local AVG_WEIGHT = 0.2
-- The longest Retry-After the gateway sends: both SDKs (openai, anthropic) ignore a longer one and back off
-- themselves.
local RETRY_AFTER_MAX = 60

local BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 }
local BUCKET_LABELS = { "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30" }

-- Prefix hits: the prompt bytes of a request the instance it went to had served before (0: a miss).
local PREFIX_BUCKETS = { 0, 1024, 4096, 16384, 65536, 262144 }

-- Add `value` (default 1) to the pool's counter `name`.
function _M.count(pool, name, value)
    counters.incr("s:" .. pool .. ":" .. name, value or 1)
end

-- Count `value` in the pool's histogram whose counters are named <bucket><n>, <count> and <sum> (`sum` added).
local function observe(pool, bounds, value, bucket, count, sum, added)
    for index, bound in ipairs(bounds) do
        if value <= bound then
            counters.incr("s:" .. pool .. ":" .. bucket .. index, 1)
            break
        end
    end
    counters.incr("s:" .. pool .. ":" .. count, 1)
    counters.incr("s:" .. pool .. ":" .. sum, added)
end

-- Record a request's wait in the pool's queue (seconds) in the histogram.
function _M.observe_wait(pool, wait)
    local us = math.floor(wait * 1e6 + 0.5)
    observe(pool, BUCKETS, wait, "b", "count", "sum_us", us)
    -- Exponentially weighted (each wait weighs AVG_WEIGHT): follows a queue that grows or drains within a few
    -- dozen admissions. Two workers may overwrite each other's update: one sample lost, never a wrong scale.
    local key = "s:" .. pool .. ":wait_avg_us"
    local avg = dict():get(key)
    dict():safe_set(key, avg and (avg + (us - avg) * AVG_WEIGHT) or us)
end

-- Record the prompt bytes a request found cached where it went (nil: prefix routing is off).
function _M.observe_prefix(pool, bytes)
    if bytes then
        observe(pool, PREFIX_BUCKETS, bytes, "p", "pcount", "psum", bytes)
    end
end

-- Retry-After (whole seconds) of a busy answer for `pool`: the moving average of its measured queue waits, rounded
-- up, within 1..RETRY_AFTER_MAX; gateway_retry_after before the pool has admitted anything. A client that comes
-- back after it finds a queue that has turned over about once.
function _M.retry_after(pool)
    local avg = pool and dict():get("s:" .. pool .. ":wait_avg_us")
    if not avg then
        return settings.cfg.retry_after
    end
    return math.max(1, math.min(RETRY_AFTER_MAX, math.ceil(avg / 1e6)))
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

-- The pool's prefix-hit histogram as /herd/pools reports it: cumulative buckets by upper bound (bytes), sum, count.
function _M.prefix_bytes(pool)
    local buckets, running = {}, 0
    for index, bound in ipairs(PREFIX_BUCKETS) do
        running = running + _M.get(pool, "p" .. index)
        buckets[tostring(bound)] = running
    end
    local count = _M.get(pool, "pcount")
    buckets["+Inf"] = count
    return { buckets = buckets, sum = _M.get(pool, "psum"), count = count }
end

return _M
