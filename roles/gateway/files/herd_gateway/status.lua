-- herd gateway: /herd/pools, the state of every model pool (herd-exporter turns it into metrics).
--
-- Owns: pools_status (content_by_lua of /herd/pools): per pool its queue, counters, wait histogram and
-- instances (in flight, max_conns, down).
-- Shared-dict keys: reads q:<pool>:w (queue.waiting), s:<pool>:<stat> (stats), i:<key> and f:<key> (slots);
-- writes none.
local queue = require("herd_gateway.queue")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local stats = require("herd_gateway.stats")

local _M = {}

function _M.pools_status()
    local cfg = settings.cfg
    local pools = {}
    for _, name in ipairs(cfg.pool_names) do
        local function get(stat_name)
            return stats.get(name, stat_name)
        end
        local instances = {}
        for _, server in ipairs(cfg.pools[name]) do
            instances[#instances + 1] = {
                key = server.key, endpoint = server.endpoint, inflight = slots.inflight(server),
                max_conns = server.max_conns, down = server.down or slots.failed(server),
            }
        end
        pools[#pools + 1] = {
            name = name,
            queued = queue.waiting(name),
            queue_max = cfg.queue_max,
            admitted = get("admitted"),
            rejected_full = get("rejected_full"),
            rejected_timeout = get("rejected_timeout"),
            abandoned = get("abandoned"),
            affinity = cfg.affinity,
            affinity_hits = get("affinity_hits"),
            affinity_misses = get("affinity_misses"),
            affinity_new = get("affinity_new"),
            wait_seconds = stats.wait_seconds(name),
            instances = instances,
        }
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.say(respond.encode_list("pools", pools))
end

return _M
