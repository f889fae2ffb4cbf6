-- herd gateway: the configuration (settings, servers, pools), built once per nginx start or reload.
--
-- Owns: init (init_by_lua: the settings role gateway renders, the endpoint table, servers.json, drained.json,
-- gateway_drain and the API key record),
-- build (settings + records -> configuration, pure apart from the DNS lookup), configure (the one way to set
-- the configuration every module reads as settings.cfg; read-only afterwards), durations, DNS resolution.
-- Shared-dict keys: none.
local apikeys = require("herd_gateway.apikeys")
local cjson = require("cjson.safe")
local endpoints = require("herd_gateway.endpoints")
local names = require("herd_gateway.names")

local _M = {}

-- The configuration in use (nil until configure): settings, servers, by_key, by_endpoint, pools, pool_names,
-- model_options, client_options (pool -> set of option names clients may set), endpoints (the index),
-- body_max (limit class -> bytes), body_memory (bytes of bodies held at once), expose_upstream.
_M.cfg = nil

local function seconds(value, default)
    if value == nil or value == "" then
        return default
    end
    if type(value) == "number" then
        return value
    end
    local number, unit = tostring(value):match("^(%d+)(%a*)$")
    if not number then
        error("herd gateway: bad duration " .. tostring(value))
    end
    local factor = ({ [""] = 1, s = 1, ms = 0.001, m = 60, h = 3600, d = 86400 })[unit]
    if not factor then
        error("herd gateway: bad duration " .. tostring(value))
    end
    return tonumber(number) * factor
end

local function read_json(path, default)
    local handle = io.open(path, "r")
    if not handle then
        if default ~= nil then
            return default
        end
        error("herd gateway: cannot read " .. path .. " (deploy the gateway with site.yml)")
    end
    local text = handle:read("*a")
    handle:close()
    local value, err = cjson.decode(text)
    if value == nil then
        error("herd gateway: " .. path .. " is not JSON: " .. tostring(err))
    end
    return value
end

local function resolve(address)
    if address:match("^%d+%.%d+%.%d+%.%d+$") or address:find(":", 1, true) then
        return address
    end
    if not address:match("^[%w%.%-_]+$") then
        error("herd gateway: bad server address " .. address)
    end
    for _, db in ipairs({ "ahostsv4", "ahosts" }) do
        local pipe = io.popen("getent " .. db .. " " .. address .. " 2>/dev/null")
        if pipe then
            local out = pipe:read("*a") or ""
            pipe:close()
            local ip = out:match("^(%S+)")
            if ip then
                return ip
            end
        end
    end
    return nil
end

-- Build the configuration from the settings (a table) and the servers/drained records.
-- `resolver` (optional) maps an address to an IP (tests pass their own).
function _M.build(settings, servers_record, drained, resolver)
    resolver = resolver or resolve
    local c = {
        queue_timeout = seconds(settings.queue_timeout, 120),
        queue_max = tonumber(settings.queue_max) or 64,
        batch_aging = seconds(settings.batch_aging, 30),
        fair_share = settings.fair_share ~= false,
        anticipation = seconds(settings.anticipation, 0.05),
        token_accounting = settings.token_accounting ~= false,
        client_keep_alive = settings.client_keep_alive or "ignore",
        busy_status = tonumber(settings.busy_status) or 503,
        retry_after = tonumber(settings.retry_after) or 2,
        max_fails = tonumber(settings.max_fails) or 1,
        fail_timeout = seconds(settings.fail_timeout, 10),
        tries = tonumber(settings.tries) or 3,
        catalogue_ttl = seconds(settings.catalogue_ttl, 2),
        connect_timeout = seconds(settings.connect_timeout, 3),
        -- "prefix", "conversation" or nil (off); true is "prefix" (gateway_affinity's booleans).
        affinity = (settings.affinity == true or settings.affinity == "prefix") and "prefix"
            or (settings.affinity == "conversation" and "conversation") or nil,
        affinity_ttl = seconds(settings.affinity_ttl, 600),
        prefix_block_bytes = math.max(64, tonumber(settings.prefix_block_bytes) or 1024),
        prefix_max_blocks = math.max(1, tonumber(settings.prefix_max_blocks) or 256),
        prefix_max_imbalance = tonumber(settings.prefix_max_imbalance) or 2,
        prefix_max_wait = seconds(settings.prefix_max_wait, 2),
        prefix_prefill_rate = math.max(1, tonumber(settings.prefix_prefill_rate) or 20000),
        prefix_host_cache_bytes = math.max(0, tonumber(settings.prefix_host_cache_bytes) or 0),
        servers = {}, by_key = {}, by_endpoint = {}, pools = {}, pool_names = {},
        model_options = {}, client_options = {},
        endpoints = endpoints.index(settings.endpoints),
        body_max = {},
        expose_upstream = settings.expose_upstream == true,
        body_memory = settings.body_memory and _M.bytes(settings.body_memory) or nil,
    }
    for class, size in pairs(settings.body_max or {}) do
        c.body_max[class] = _M.bytes(size)
    end
    local down = {}
    for _, target in ipairs(drained or {}) do
        down[tostring(target)] = true
    end
    for _, s in ipairs(servers_record.servers or {}) do
        local server = {
            key = s.key, host = s.host, address = s.address, port = tonumber(s.port),
            endpoint = s.endpoint, ip = resolver(tostring(s.address)),
            max_conns = tonumber(s.max_conns) or 1, num_parallel = tonumber(s.num_parallel) or 1,
            weight = tonumber(s.weight) or 1,
            backup = s.backup == true, models = {},
            down = down[s.key] == true or down[s.host] == true,
        }
        if not server.ip then
            -- Like a failed instance: it gets nothing until a reload resolves it.
            ngx.log(ngx.ERR, "herd gateway: host not found: ", tostring(s.address), " (", s.key, " gets no request)")
            server.ip, server.down = "0.0.0.0", true
        end
        server.peer = (server.ip:find(":", 1, true) and ("[" .. server.ip .. "]") or server.ip) .. ":" .. server.port
        for _, m in ipairs(s.models or {}) do
            local key = names.model_key(m)
            if key then
                server.models[#server.models + 1] = key
            end
        end
        c.servers[#c.servers + 1] = server
        c.by_key[server.key] = server
        c.by_endpoint[server.peer] = server
        c.by_endpoint[server.endpoint] = server
        for _, model in ipairs(server.models) do
            if not c.pools[model] then
                c.pools[model] = {}
                c.pool_names[#c.pool_names + 1] = model
            end
            table.insert(c.pools[model], server)
        end
    end
    table.sort(c.pool_names)
    c.pools[endpoints.ANY] = c.servers
    for model, options in pairs(settings.model_options or {}) do
        local key = names.model_key(model)
        if key then
            c.model_options[key] = options
        end
    end
    -- Options clients may set, per pool: the sampling ones, gateway_client_options["*"] and the pool's own.
    local client = settings.client_options or {}
    for _, model in ipairs(c.pool_names) do
        local allowed = {}
        for _, list in ipairs({ settings.sampling_options or {}, client["*"] or {} }) do
            for _, name in ipairs(list) do
                allowed[name] = true
            end
        end
        for name, list in pairs(client) do
            if name ~= "*" and names.model_key(name) == model then
                for _, option in ipairs(list) do
                    allowed[option] = true
                end
            end
        end
        c.client_options[model] = allowed
    end
    return c
end

-- Bytes of an nginx size ("16m", "64k", "1024").
function _M.bytes(size)
    local number, unit = tostring(size):match("^(%d+)([kKmMgG]?)$")
    if not number then
        error("herd gateway: bad size " .. tostring(size))
    end
    return tonumber(number) * (({ [""] = 1, k = 1024, m = 1048576, g = 1073741824 })[unit:lower()])
end

-- Use the configuration `c` (a build result) from now on: init calls it at every nginx start and reload, the
-- unit tests with their own build.
function _M.configure(c)
    _M.cfg = c
    endpoints.configure(c.endpoints)
end

-- init_by_lua: the settings rendered by role gateway (JSON text naming servers_file and drained_file) and the
-- endpoint table (one JSON text per endpoint: nginx reads an inlined string of at most 4 KiB). `overrides`
-- (servers_file, drained_file: candidate records, for herd-nginx-check) replace the settings' paths.
function _M.init(settings_json, endpoint_jsons, overrides)
    local settings = cjson.decode(settings_json)
    if type(settings) ~= "table" then
        error("herd gateway: settings are not JSON")
    end
    for name, value in pairs(overrides or {}) do
        if value ~= "" then
            settings[name] = value
        end
    end
    settings.endpoints = {}
    for index, text in ipairs(endpoint_jsons or {}) do
        settings.endpoints[index] = cjson.decode(text) or error("herd gateway: endpoint " .. index .. " is not JSON")
    end
    apikeys.load(settings.keys_file)
    local record = read_json(settings.servers_file)
    local drained = read_json(settings.drained_file, {})
    for _, target in ipairs(settings.drain or {}) do
        drained[#drained + 1] = target
    end
    _M.configure(_M.build(settings, record, drained))
end

return _M
