-- herd gateway: the shared dicts and every key the gateway keeps in them (the one list of key prefixes).
--
-- Owns: the dict names (nginx: lua_shared_dict herd_gateway / herd_queue / herd_affinity, role gateway's template)
-- and KEYS, the documentation of every key shape; gateway(), queue() and affinity() return the dicts.
-- herd_gateway and herd_queue are written only with calls that never evict (safe_set, safe_add, incr of a key
-- that exists: counters.incr): a full dict refuses the write and the request is answered 503; herd_affinity is
-- the one dict whose least recently used entries nginx may drop.
-- Shared-dict keys: none read or written here. tests/unit/gateway/test_keys.py scans every module for the keys
-- it builds and fails on a shape KEYS does not list, on one the module's own header does not name, and on an
-- entry of KEYS no code builds (or that another module than its owner builds).
local _M = {}

-- Slots, queue counters, per-worker shares, statistics and the catalogue cache: common to every worker and kept
-- across reloads. Its keys are bounded by the servers, pools and workers (never one per request).
_M.GATEWAY = "herd_gateway"
-- The queue's per-request markers (one or two per waiting request): apart, so that a burst of waiting requests
-- fills this dict, never the counters'.
_M.QUEUE = "herd_queue"
-- Cache affinity (prompt-prefix blocks and sessions -> instances): apart, so that its least-recently-used eviction never touches the slots.
_M.AFFINITY = "herd_affinity"

-- Every key shape (<...>: a variable part), its dict, its owner module and its meaning.
_M.KEYS = {
    { dict = "herd_gateway", key = "i:<key>", owner = "slots",
      meaning = "requests in flight on instance <key> (all pools together; limit = its max_conns; counters.add)" },
    { dict = "herd_gateway", key = "f:<key>", owner = "slots",
      meaning = "failures of instance <key> within fail_timeout (expires after fail_timeout)" },
    { dict = "herd_gateway", key = "r:<pool>", owner = "slots",
      meaning = "turn counter of the pool: equally loaded instances take turns" },
    { dict = "herd_gateway", key = "t:<key>", owner = "slots",
      meaning = "time of instance <key>'s last upstream byte, or of the admission that found it idle (progress)" },
    { dict = "herd_gateway", key = "d:<key>", owner = "slots",
      meaning = "instance <key> is drained (drained.json and gateway_drain, applied at init and by /herd/admin/drained)" },
    { dict = "herd_gateway", key = "v:drained", owner = "slots",
      meaning = "version of the d: flags: a worker that has not seen it applies them to its servers" },
    { dict = "herd_gateway", key = "q:<fifo>:t", owner = "queue",
      meaning = "ticket counter of an API key's FIFO in a pool (<fifo> = <pool>|<key>; last ticket handed out)" },
    { dict = "herd_gateway", key = "q:<fifo>:h", owner = "queue",
      meaning = "ticket at the head of an API key's FIFO in a pool" },
    { dict = "herd_gateway", key = "o:<fifo>", owner = "queue",
      meaning = "slots of the pool the API key holds now (its share for fair share; counters.add)" },
    { dict = "herd_gateway", key = "q:<pool>:w", owner = "queue",
      meaning = "requests waiting in the pool's queue (counters.add)" },
    { dict = "herd_queue", key = "q:<fifo>:l:<n>", owner = "queue",
      meaning = "ticket n is alive: its holder refreshes it (1 s) while it polls; a missing one counts as gone" },
    { dict = "herd_queue", key = "q:<fifo>:g:<n>", owner = "queue",
      meaning = "ticket n left the queue (timed out, hung up, rejected): skipped at the head" },
    { dict = "herd_queue", key = "q:<fifo>:a:<n>", owner = "queue",
      meaning = "one worker is moving the head past ticket n (add() marker, 10 s)" },
    { dict = "herd_queue", key = "a:<fifo>", owner = "queue",
      meaning = "the API key's anticipated candidate after its request ended (gateway_fair_share_anticipation)" },
    { dict = "herd_queue", key = "m:<fifo>", owner = "queue",
      meaning = "the API key's candidate in the pool: \"<class> <arrival>\" (1 s, refreshed while it polls)" },
    { dict = "herd_gateway", key = "s:<pool>:<stat>", owner = "stats",
      meaning = "counters of /herd/pools: admitted, rejected_*, abandoned, affinity_*, count, sum_us, b<n>; "
          .. "wait_avg_us; p<n>, pcount, psum (prefix hits)" },
    { dict = "herd_gateway", key = "b:held", owner = "body",
      meaning = "bytes of request bodies the gateway holds now, over every worker (limit: body_memory; counters.add)" },
    { dict = "herd_gateway", key = "e:<key>", owner = "tenants",
      meaning = "requests of API key <key> in flight or queued (limit: its max_requests; counters.add)" },
    { dict = "herd_gateway", key = "u:<key>:<minute>", owner = "usage",
      meaning = "tokens API key <key> spent in that minute (limit: its tokens_per_minute; expires after 120 s)" },
    { dict = "herd_gateway", key = "n:<pid>", owner = "counters",
      meaning = "worker <pid> is registered: the start time of /proc/<pid>/stat (tells a reused pid)" },
    { dict = "herd_gateway", key = "w:<pid>:<counter>", owner = "counters",
      meaning = "worker <pid>'s share of <counter>: taken off the counter when the worker dies" },
    { dict = "herd_gateway", key = "k:reap", owner = "counters",
      meaning = "a worker reaps the shares of dead workers this second (1 s): the others skip" },
    { dict = "herd_gateway", key = "c:<path>", owner = "catalogue",
      meaning = "cached catalogue answer of <path> (/api/tags, /v1/models, /api/ps), served while it is refreshed" },
    { dict = "herd_gateway", key = "c:<path>:f", owner = "catalogue",
      meaning = "the cached answer of <path> is fresh (catalogue_ttl; /api/ps 1 s)" },
    { dict = "herd_gateway", key = "c:<path>:l", owner = "catalogue",
      meaning = "one request refreshes the answer of <path> (add() lock, 15 s at most)" },
    { dict = "herd_gateway", key = "g:<key>", owner = "affinity",
      meaning = "sequence number of the last request with a prompt chain sent to instance <key> (its slots hold "
          .. "about the last num_parallel: prefix routing's freshness)" },
    { dict = "herd_gateway", key = "gb:<key>", owner = "affinity",
      meaning = "prompt bytes of the requests with a prompt chain sent to instance <key> (its host-memory cache "
          .. "holds about the last prefix_host_cache_bytes: prefix routing's freshness)" },
    { dict = "herd_gateway", key = "x:id", owner = "affinity",
      meaning = "id of the last pending mark (affinity.mark; counters.incr)" },
    { dict = "herd_affinity", key = "x:<hash>", owner = "affinity",
      meaning = "id of the pending mark of a request in flight that evaluates a long prefix cold ending in this "
          .. "block (60 s at most)" },
    { dict = "herd_affinity", key = "xa:<id>", owner = "affinity",
      meaning = "pending mark <id>'s request is in flight: its instance key (deleted when it ends; 60 s at most)" },
    { dict = "herd_affinity", key = "xw:<id>", owner = "affinity",
      meaning = "one request waits for pending mark <id>'s request (affinity.await; 60 s)" },
    { dict = "herd_affinity", key = "s:<md5>", owner = "affinity",
      meaning = "instance key that served the conversation named by the session header last (affinity_ttl)" },
    { dict = "herd_affinity", key = "p:<md5>", owner = "affinity",
      meaning = "instance key that served the conversation with this model and prompt prefix last (affinity_ttl)" },
    { dict = "herd_affinity", key = "h:<hash>", owner = "affinity",
      meaning = "\"<instance key>@<its sequence number>@<its byte count>\" of the instances that served a prompt whose chain of "
          .. "blocks ends in this one, most recent first (at most 3; affinity_ttl)" },
}

-- The dict of slots, queues, counters and catalogue.
function _M.gateway()
    return ngx.shared[_M.GATEWAY]
end

-- The dict of the queue's per-request markers.
function _M.queue()
    return ngx.shared[_M.QUEUE]
end

-- The dict of conversation affinity.
function _M.affinity()
    return ngx.shared[_M.AFFINITY]
end

return _M
