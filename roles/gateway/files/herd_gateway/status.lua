-- herd gateway: /herd/pools, the state of every model pool and instance (herd-exporter turns it into metrics,
-- herd-guard judges the instances by it), and the loopback admin location of the drain command.
--
-- Owns: pools_status (content_by_lua of /herd/pools): per pool its queue, counters, wait histogram and
-- instances (in flight, max_conns, down); per instance (the one source of membership and in-flight counts) its
-- pools ("*" included), in flight, max_conns, num_parallel, drained, down and progress_age; the bytes of
-- request bodies held now (body_held) and every shared dict's capacity and free space (dicts). admin_drained
-- (content_by_lua of /herd/admin/drained): applies drained.json and gateway_drain now, on every worker.
-- Shared-dict keys: reads q:<pool>:w (queue.waiting), s:<pool>:<stat> (stats), i:<key>, f:<key>, t:<key> and
-- d:<key> (slots), b:held (body.held); writes d:<key> and v:drained through slots.apply_drained.
local body = require("herd_gateway.body")
local cjson = require("cjson.safe")
local counters = require("herd_gateway.counters")
local queue = require("herd_gateway.queue")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local stats = require("herd_gateway.stats")

local _M = {}

-- The drained record and the drains rendered into the settings (gateway_drain), set by configure_admin at init.
local drained_file, static_drain = nil, {}

function _M.configure_admin(file, drain)
    drained_file, static_drain = file, drain or {}
end

-- The drained targets now: drained.json (written by herd-gateway-drain) and gateway_drain.
function _M.drained_targets()
    local targets = {}
    local handle, err = nil, nil
    if drained_file then
        handle, err = io.open(drained_file, "r")
        if not handle and not tostring(err):find("No such file", 1, true) then
            return nil, "cannot read the drained record: " .. tostring(err)
        end
    end
    if handle then
        local doc = cjson.decode(handle:read("*a") or "")
        handle:close()
        local count = 0
        for _ in pairs(type(doc) == "table" and doc or {}) do
            count = count + 1
        end
        if type(doc) ~= "table" or count ~= #doc then
            return nil, drained_file .. " is not a JSON list"
        end
        for index, target in ipairs(doc) do
            if type(target) ~= "string" then
                return nil, drained_file .. ": entry " .. index .. " is not a \"host\" or \"host:id\" string"
            end
            targets[#targets + 1] = target
        end
    end
    for _, target in ipairs(static_drain) do
        targets[#targets + 1] = tostring(target)
    end
    return targets
end

-- Every instance once, in the servers' order: the gateway's own view of it.
local function instances()
    local cfg = settings.cfg
    local pools_of = {}
    for _, name in ipairs(cfg.pool_names) do
        for _, server in ipairs(cfg.pools[name]) do
            pools_of[server.key] = pools_of[server.key] or {}
            table.insert(pools_of[server.key], name)
        end
    end
    local list = {}
    for index, server in ipairs(cfg.servers) do
        local pools = pools_of[server.key] or {}
        pools[#pools + 1] = "*"
        local age = slots.progress_age(server)
        list[index] = respond.canonical({
            key = server.key, host = server.host, endpoint = server.endpoint, pools = pools,
            inflight = slots.inflight(server), max_conns = server.max_conns, num_parallel = server.num_parallel,
            drained = server.drained == true, down = server.down or slots.failed(server),
            progress_age = age and math.floor(age * 10 + 0.5) / 10 or nil,
        })
    end
    return '"instances":[' .. table.concat(list, ",") .. "],"
end

-- content_by_lua of /herd/admin/drained (loopback only, POST): drained.json now, on every worker.
function _M.admin_drained()
    if ngx.req.get_method() ~= "POST" then
        return respond.answer(405, "POST applies the drained record")
    end
    local targets, err = _M.drained_targets()
    if not targets then
        return respond.answer(500, err)
    end
    local keys = slots.apply_drained(targets)
    slots.sync_drained()
    for index, key in ipairs(keys) do
        keys[index] = cjson.encode(key)
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.say(respond.encode_list("drained", keys))
end

function _M.pools_status()
    slots.sync_drained()
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
                drained = server.drained == true,
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
            affinity = cfg.affinity or false,
            affinity_hits = get("affinity_hits"),
            affinity_misses = get("affinity_misses"),
            affinity_new = get("affinity_new"),
            prefix_waits = cfg.affinity == "prefix" and get("prefix_waits") or nil,
            prefix_hit_bytes = cfg.affinity == "prefix" and stats.prefix_bytes(name) or nil,
            wait_seconds = stats.wait_seconds(name),
            retry_after = stats.retry_after(name),
            instances = instances,
        }
    end
    ngx.header["Content-Type"] = "application/json"
    local dicts = {}
    for index, entry in ipairs(counters.free_space()) do
        dicts[index] = respond.canonical(entry)
    end
    local prefix = '"body_held":' .. body.held() .. "," .. respond.encode_list("dicts", dicts):sub(2, -2) .. ","
    ngx.say(respond.encode_list("pools", pools, prefix .. instances()))
end

return _M
