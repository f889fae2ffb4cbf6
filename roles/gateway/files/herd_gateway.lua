-- herd gateway: model pools, slots, the fair wait queue and the cluster catalogue inside nginx (lua-nginx-module).
--
-- Loaded by init_by_lua (nginx master, at every start and reload) with the settings rendered by role gateway.
-- The servers come from the gateway host's record (servers.json, written by the role) and the drained ones
-- from drained.json plus gateway_drain, so a drain is: write drained.json, nginx -t, reload.
--
-- Shared state (lua_shared_dict herd_gateway, common to every worker and kept across reloads):
--   i:<key>           requests in flight on instance <key> (all pools together; limit = its max_conns)
--   f:<key>           failures of instance <key> within fail_timeout
--   q:<pool>:t / :h   ticket counter / ticket at the head of the pool's FIFO
--   q:<pool>:g:<n>    ticket n left the queue (timed out, hung up, rejected): skipped at the head
--   q:<pool>:w        requests waiting in the pool's queue
--   s:<pool>:<stat>   counters of /herd/pools
--   c:<path>          cached catalogue answer
-- Conversation affinity (lua_shared_dict herd_affinity, apart so that its LRU eviction never touches the slots):
--   <key>             instance that served the conversation <key> last (expires after affinity_ttl)
local cjson = require("cjson.safe")
local body = require("herd_gateway.body")
local endpoints = require("herd_gateway.endpoints")
local names = require("herd_gateway.names")

local _M = {}

local DICT_NAME = "herd_gateway"
local AFFINITY_DICT = "herd_affinity"
-- Conversation key: the explicit session header, else the model and the first bytes of what every turn of a
-- conversation resends unchanged (chat: the messages up to the first user message; completion: system + prompt).
local AFFINITY_HEADER = "http_x_herd_session"
local AFFINITY_PREFIX_BYTES = 1024
local ANY = "*"
local BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 }
local BUCKET_LABELS = { "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30" }
local cfg            -- settings, servers, pools (built in init, read-only afterwards)

-- ------------------------------------------------------------------------------------------ model names

-- Ollama's name rule, ported from plugins/module_utils/ollama_names.py (herd_gateway/names.lua).
_M.model_key = require("herd_gateway.names").model_key

-- ------------------------------------------------------------------------------------------ settings

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
        client_keep_alive = settings.client_keep_alive or "ignore",
        busy_status = tonumber(settings.busy_status) or 503,
        retry_after = tonumber(settings.retry_after) or 2,
        max_fails = tonumber(settings.max_fails) or 1,
        fail_timeout = seconds(settings.fail_timeout, 10),
        tries = tonumber(settings.tries) or 3,
        catalogue_ttl = seconds(settings.catalogue_ttl, 2),
        connect_timeout = seconds(settings.connect_timeout, 3),
        affinity = settings.affinity == true,
        affinity_ttl = seconds(settings.affinity_ttl, 600),
        servers = {}, by_key = {}, by_endpoint = {}, pools = {}, pool_names = {},
        model_options = {}, client_options = {},
        endpoints = endpoints.index(settings.endpoints),
        body_max = {},
        expose_upstream = settings.expose_upstream == true,
    }
    for class, size in pairs(settings.body_max or {}) do
        c.body_max[class] = _M.bytes(size)
    end
    local down = {}
    local known_hosts = {}
    for _, s in ipairs(servers_record.servers or {}) do
        known_hosts[s.host] = true
    end
    for _, target in ipairs(drained or {}) do
        down[tostring(target)] = true
    end
    for _, s in ipairs(servers_record.servers or {}) do
        local server = {
            key = s.key, host = s.host, address = s.address, port = tonumber(s.port),
            endpoint = s.endpoint, ip = resolver(tostring(s.address)),
            max_conns = tonumber(s.max_conns) or 1, weight = tonumber(s.weight) or 1,
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
            local key = _M.model_key(m)
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
    c.pools[ANY] = c.servers
    for model, options in pairs(settings.model_options or {}) do
        local key = _M.model_key(model)
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
            if name ~= "*" and _M.model_key(name) == model then
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

function _M.init(settings_json, endpoint_jsons)
    local settings = cjson.decode(settings_json)
    if type(settings) ~= "table" then
        error("herd gateway: settings are not JSON")
    end
    settings.endpoints = {}
    for index, text in ipairs(endpoint_jsons or {}) do
        settings.endpoints[index] = cjson.decode(text) or error("herd gateway: endpoint " .. index .. " is not JSON")
    end
    local record = read_json(settings.servers_file)
    local drained = read_json(settings.drained_file, {})
    for _, target in ipairs(settings.drain or {}) do
        drained[#drained + 1] = target
    end
    cfg = _M.build(settings, record, drained)
    _M.cfg = cfg
    endpoints.configure(cfg.endpoints)
    require("herd_gateway.apikeys").load(settings.keys_file)
end

-- Tests: use a configuration built with _M.build.
function _M._set_cfg(value)
    cfg = value
    _M.cfg = value
    endpoints.configure(value.endpoints)
end

-- ------------------------------------------------------------------------------------------ slots

local function dict()
    return ngx.shared[DICT_NAME]
end

local function inflight(server)
    return dict():get("i:" .. server.key) or 0
end

local function failed(server)
    return (dict():get("f:" .. server.key) or 0) >= cfg.max_fails
end

-- Take a slot on the server if it has one free (atomic over every worker). Returns true when taken.
local function take(server)
    local d = dict()
    local n = d:incr("i:" .. server.key, 1, 0)
    if n and n <= server.max_conns then
        return true
    end
    d:incr("i:" .. server.key, -1, 0)
    return false
end

local function give_back(key)
    if key and key ~= "" then
        local n = dict():incr("i:" .. key, -1, 0)
        if n and n < 0 then
            dict():set("i:" .. key, 0)
        end
    end
end
_M.give_back = give_back

-- Servers of a pool that may receive a request now, least loaded (in flight / weight) first, backups last;
-- equally loaded servers take turns (a rotating start, like nginx's least_conn falls back to round-robin).
local function candidates(pool, exclude)
    local list = {}
    local servers = cfg.pools[pool] or {}
    local n = #servers
    local turn = n > 1 and (dict():incr("r:" .. pool, 1, 0) or 0) or 0
    for index, server in ipairs(servers) do
        if not server.down and not failed(server) and not (exclude and exclude[server.key]) then
            list[#list + 1] = { server = server, load = inflight(server) / server.weight,
                                order = (index - 1 - turn) % n }
        end
    end
    table.sort(list, function(a, b)
        if a.server.backup ~= b.server.backup then
            return not a.server.backup
        end
        if a.load ~= b.load then
            return a.load < b.load
        end
        return a.order < b.order
    end)
    return list
end
_M.candidates = candidates

local function in_pool(pool, server)
    for _, member in ipairs(cfg.pools[pool] or {}) do
        if member == server then
            return true
        end
    end
    return false
end

-- Take a slot on the least loaded candidate with one free; returns the server, or nil and whether any
-- candidate exists at all. `preferred` (conversation affinity) is taken first when it is a live, non-backup
-- member of the pool with a free slot: affinity never goes past an instance's max_conns (bounded load).
local function acquire(pool, exclude, preferred)
    if preferred and not preferred.down and not preferred.backup and not failed(preferred)
        and not (exclude and exclude[preferred.key]) and in_pool(pool, preferred) and take(preferred) then
        return preferred, true
    end
    local list = candidates(pool, exclude)
    for _, entry in ipairs(list) do
        if take(entry.server) then
            return entry.server, true
        end
    end
    return nil, #list > 0
end
_M.acquire = acquire

-- ------------------------------------------------------------------------------------------ statistics

local function stat(pool, name, value)
    dict():incr("s:" .. pool .. ":" .. name, value or 1, 0)
end

local function observe_wait(pool, wait)
    local d = dict()
    for index, bound in ipairs(BUCKETS) do
        if wait <= bound then
            d:incr("s:" .. pool .. ":b" .. index, 1, 0)
            break
        end
    end
    d:incr("s:" .. pool .. ":count", 1, 0)
    d:incr("s:" .. pool .. ":sum_us", math.floor(wait * 1e6 + 0.5), 0)
end

-- ------------------------------------------------------------------------------------------ answers

-- JSON with object keys in sorted order, so that every worker writes the same text for the same data (cjson
-- follows Lua's table order). Empty tables are written as {} (as cjson does).
local function canonical(value)
    if type(value) ~= "table" then
        return cjson.encode(value)
    end
    local n = #value
    local parts = {}
    if n > 0 then
        for index = 1, n do
            parts[index] = canonical(value[index])
        end
        return "[" .. table.concat(parts, ",") .. "]"
    end
    local keys = {}
    for key in pairs(value) do
        keys[#keys + 1] = tostring(key)
    end
    table.sort(keys)
    for index, key in ipairs(keys) do
        parts[index] = cjson.encode(key) .. ":" .. canonical(value[key])
    end
    return "{" .. table.concat(parts, ",") .. "}"
end
_M.canonical = canonical

-- {"<name>":[...]} with the list written as a JSON array even when empty (cjson writes {} for an empty table).
local function encode_list(name, items, prefix)
    local parts = {}
    for index, item in ipairs(items) do
        parts[index] = type(item) == "string" and item or canonical(item)
    end
    return "{" .. (prefix or "") .. cjson.encode(name) .. ":[" .. table.concat(parts, ",") .. "]}"
end

local function answer(status, message, retry_after)
    ngx.status = status
    ngx.header["Content-Type"] = "application/json; charset=utf-8"
    if retry_after then
        ngx.header["Retry-After"] = tostring(retry_after)
    end
    ngx.say(cjson.encode({ error = message }))
    return ngx.exit(ngx.HTTP_OK)
end

local function busy(message)
    return answer(cfg.busy_status, message, cfg.retry_after)
end

-- ------------------------------------------------------------------------------------------ request body

_M.object_members = body.object_members

-- ------------------------------------------------------------------------------------------ affinity

-- The conversation key of a request (nil: no affinity), from the model, the path, the decoded body and the
-- session header. Two turns of one chat resend the same first messages, so they get the same key.
-- `tenant` (the API key name) is part of every key: one tenant cannot probe which prompts another has cached.
function _M.affinity_key(model, path, doc, session, tenant)
    model = (tenant or "") .. "\0" .. model
    if type(session) == "table" then
        session = session[1]
    end
    if type(session) == "string" and session ~= "" then
        return "s:" .. ngx.md5(model .. "\0" .. session)
    end
    local kind = endpoints.AFFINITY_PATHS[path]
    local parts = {}
    if kind == "chat" then
        if type(doc.messages) ~= "table" then
            return nil
        end
        for _, m in ipairs(doc.messages) do
            if type(m) ~= "table" then
                break
            end
            local content = m.content
            if type(content) ~= "string" then
                content = cjson.encode(content) or ""
            end
            parts[#parts + 1] = tostring(m.role) .. "\0" .. content
            if m.role == "user" then
                break
            end
        end
    elseif kind == "prompt" then
        if type(doc.prompt) ~= "string" or doc.prompt == "" then
            return nil
        end
        parts[1] = (type(doc.system) == "string" and doc.system or "") .. "\0" .. doc.prompt
    end
    local text = table.concat(parts, "\0")
    if text == "" then
        return nil
    end
    return "p:" .. ngx.md5(model .. "\0" .. text:sub(1, AFFINITY_PREFIX_BYTES))
end

-- The instance that served the conversation last, or nil.
local function affinity_lookup(key)
    local value = ngx.shared[AFFINITY_DICT]:get(key)
    return value and cfg.by_key[value] or nil
end
_M.affinity_lookup = affinity_lookup

-- Remember the instance of a conversation (a full zone drops the least recently used entries).
local function affinity_remember(key, server)
    ngx.shared[AFFINITY_DICT]:set(key, server.key, cfg.affinity_ttl)
end
_M.affinity_remember = affinity_remember

-- ------------------------------------------------------------------------------------------ the wait queue

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
local function admit(pool, affinity)
    local d = dict()
    local preferred = affinity and affinity.preferred
    local ticket = d:incr("q:" .. pool .. ":t", 1, 0)
    local alive = "q:" .. pool .. ":l:" .. ticket
    d:set(alive, 1, 1)
    local ctx = ngx.ctx
    local start = ngx.now()
    local waiting = false
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
            stat(pool, kind)
        end
    end

    ctx.herd_leave = leave
    while true do
        d:set(alive, 1, 1)
        local head = advance_head(pool)
        -- head > ticket: this ticket was skipped as dead by mistake; it competes as if at the head.
        if head >= ticket then
            local server, any = acquire(pool, nil, preferred)
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
                stat(pool, "admitted")
                observe_wait(pool, wait)
                if affinity then
                    stat(pool, not preferred and "affinity_new" or server == preferred and "affinity_hits"
                        or "affinity_misses")
                    affinity_remember(affinity.key, server)
                end
                return server
            end
            if not any then
                leave("rejected_full")
                ctx.herd_leave = nil
                return busy("server busy, please try again: no herd instance serving this model is available")
            end
        end
        if not waiting then
            local n = d:incr("q:" .. pool .. ":w", 1, 0)
            waiting = true
            if n > cfg.queue_max then
                leave("rejected_full")
                ctx.herd_leave = nil
                return busy("server busy, please try again.  maximum pending requests exceeded")
            end
        end
        ngx.update_time()
        local now = ngx.now()
        if now >= deadline then
            leave("rejected_timeout")
            ctx.herd_leave = nil
            return busy("server busy, please try again: waited " .. cfg.queue_timeout .. "s for a free herd instance")
        end
        local position = math.max(0, ticket - head)
        ngx.sleep(math.min(0.002 + 0.001 * position, 0.02, deadline - now))
    end
end

-- ------------------------------------------------------------------------------------------ phases

local function on_abort()
    local leave = ngx.ctx.herd_leave
    if leave then
        ngx.ctx.herd_leave = nil
        leave("abandoned")
    end
    return ngx.exit(499)
end

-- The body limit of an endpoint, checked on Content-Length before anything is read (and on the length read, for a
-- chunked body). Returns true, or answers 413 itself.
local function within_limit(entry, length)
    local limit = cfg.body_max[entry.body]
    if limit and length and length > limit then
        answer(413, "request body too large: " .. entry.path .. " takes at most " .. limit .. " bytes")
        return false
    end
    return true
end

-- The pool of a request for an endpoint with a model, read as Ollama will read it (body.view); the body is
-- rewritten when herd changes it. Returns the pool, or answers 400/404/413 itself.
local function route(entry, path_model)
    local ctx = ngx.ctx
    local name, view
    if entry.model == "path" then
        name = path_model
    else
        local text = body.read_body()
        if not text then
            return answer(400, "the request body must be a JSON object naming a model")
        end
        if not within_limit(entry, #text) then
            return nil
        end
        local err
        view, err = body.view(text, cjson.decode(text))
        if not view then
            return answer(400, err)
        end
        name = view.value("model")
        if (name == nil or name == "") and entry.model == "model|name" then
            name = view.value("name")
        end
    end
    if type(name) ~= "string" or name == "" then
        return answer(400, "model is required")
    end
    local model = names.model_key(name)
    if not model or not cfg.pools[model] then
        return answer(404, 'model "' .. names.short_for_error(name) .. '" not found, try pulling it first')
    end
    if view then
        local options, err
        if entry.kind == "native" then
            options, err = body.options_members(view)
            if not options then
                return answer(400, err)
            end
        end
        if cfg.affinity and entry.affinity then
            local key = _M.affinity_key(model, entry.path, { messages = view.value("messages"),
                prompt = view.value("prompt"), system = view.value("system") }, ngx.var[AFFINITY_HEADER],
                ngx.var.herd_key_name)
            if key then
                ctx.herd_affinity = { key = key, preferred = affinity_lookup(key) }
            end
        end
        local new_body = body.rewrite(view, {
            drop_keep_alive = cfg.client_keep_alive == "ignore", native = entry.kind == "native",
            allowed = cfg.client_options[model], forced = cfg.model_options[model], options = options,
        })
        if new_body then
            ngx.req.set_body_data(new_body)
        end
    end
    return model
end

-- access_by_lua of the proxied locations. `mode`: "route" (the allowlisted endpoints: every other path answers
-- 404, another method 405, without touching an instance) or "any" (model management, when it is allowed).
function _M.access(mode)
    local pool = ANY
    local ctx = ngx.ctx
    if mode == "route" then
        local entry, path_model = endpoints.find(cfg.endpoints, ngx.var.uri)
        if not entry or entry.kind == "catalogue" then
            return answer(404, "this path is not served by the herd gateway")
        end
        if not entry.methods[ngx.req.get_method()] then
            return answer(405, "method not allowed on " .. entry.path)
        end
        if not within_limit(entry, tonumber(ngx.var.http_content_length or "")) then
            return
        end
        if entry.model ~= "" then
            pool = route(entry, path_model)
            if not pool then
                return
            end
        end
    end
    ngx.var.herd_pool = pool
    ctx.herd_pool = pool
    if pool == ANY then
        -- No model: any live instance, least loaded; no slot is taken (version, health, model list).
        local list = candidates(ANY)
        if #list == 0 then
            return busy("server busy, please try again: every herd instance is unavailable")
        end
        ctx.herd_server = list[1].server
        return
    end
    local ok, err = ngx.on_abort(on_abort)
    if not ok and err ~= "duplicate call" then
        ngx.log(ngx.WARN, "herd gateway: on_abort: ", err)
    end
    local server = admit(pool, ctx.herd_affinity)
    ctx.herd_server = server
    ngx.var.herd_slot = server.key
end

-- balancer_by_lua: the chosen instance first; on a retry another candidate of the same pool.
function _M.balance()
    local balancer = require("ngx.balancer")
    local ctx = ngx.ctx
    local server = ctx.herd_server
    if not server then
        return ngx.exit(500)
    end
    if ctx.herd_tried then
        -- A retry: the last instance failed before sending a byte.
        local d = dict()
        local last = server
        d:incr("f:" .. last.key, 1, 0, cfg.fail_timeout)
        ctx.herd_tried[last.key] = true
        local next_server
        if ctx.herd_pool == ANY then
            local list = candidates(ANY, ctx.herd_tried)
            next_server = list[1] and list[1].server
        else
            next_server = acquire(ctx.herd_pool, ctx.herd_tried)
            if next_server then
                give_back(last.key)
                ngx.var.herd_slot = next_server.key
                if ctx.herd_affinity then
                    affinity_remember(ctx.herd_affinity.key, next_server)
                end
            end
        end
        if not next_server then
            return ngx.exit(502)
        end
        server = next_server
        ctx.herd_server = server
    else
        ctx.herd_tried = {}
        if cfg.tries > 1 then
            balancer.set_more_tries(cfg.tries - 1)
        end
    end
    local ok, err = balancer.set_current_peer(server.ip, server.port)
    if not ok then
        ngx.log(ngx.ERR, "herd gateway: set_current_peer ", server.key, ": ", err)
        return ngx.exit(500)
    end
end

-- header_filter_by_lua of the proxied locations: an instance's own 503 (Ollama's queue full, "server busy ...
-- maximum pending requests exceeded", sent without Retry-After) leaves with the Retry-After of the gateway's own
-- busy answers; its status and body are the instance's. A Retry-After the instance sent is kept. The 503 is not
-- retried elsewhere (proxy_next_upstream is error/timeout only) and does not mark the instance failed: it
-- answered. The access log tells it from the gateway's own 503 by upstream_status.
function _M.header_filter()
    if ngx.status == 503 and not ngx.header["Retry-After"] then
        ngx.header["Retry-After"] = tostring(cfg.retry_after)
    end
end

-- log_by_lua (every request, every path): give the slot back; count a failure when the last attempt got
-- no answer.
function _M.log()
    local key = ngx.var.herd_slot
    if key and key ~= "" then
        give_back(key)
    end
    local status = ngx.var.status
    local header_times = ngx.var.upstream_header_time
    if (status == "502" or status == "504") and header_times and header_times:match("%-$") then
        local addr = (ngx.var.upstream_addr or ""):match("([^, ]+)$")
        local server = addr and cfg.by_endpoint[addr]
        if server then
            dict():incr("f:" .. server.key, 1, 0, cfg.fail_timeout)
        end
    end
end

-- ------------------------------------------------------------------------------------------ pool status

function _M.pools_status()
    local d = dict()
    local pools = {}
    for _, name in ipairs(cfg.pool_names) do
        local function get(stat_name)
            return d:get("s:" .. name .. ":" .. stat_name) or 0
        end
        local buckets, running = {}, 0
        for index, label in ipairs(BUCKET_LABELS) do
            running = running + get("b" .. index)
            buckets[label] = running
        end
        buckets["+Inf"] = get("count")
        local instances = {}
        for _, server in ipairs(cfg.pools[name]) do
            instances[#instances + 1] = {
                key = server.key, endpoint = server.endpoint, inflight = inflight(server),
                max_conns = server.max_conns, down = server.down or failed(server),
            }
        end
        pools[#pools + 1] = {
            name = name,
            queued = math.max(0, d:get("q:" .. name .. ":w") or 0),
            queue_max = cfg.queue_max,
            admitted = get("admitted"),
            rejected_full = get("rejected_full"),
            rejected_timeout = get("rejected_timeout"),
            abandoned = get("abandoned"),
            affinity = cfg.affinity,
            affinity_hits = get("affinity_hits"),
            affinity_misses = get("affinity_misses"),
            affinity_new = get("affinity_new"),
            wait_seconds = { buckets = buckets, sum = get("sum_us") / 1e6, count = get("count") },
            instances = instances,
        }
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.say(encode_list("pools", pools))
end

-- ------------------------------------------------------------------------------------------ catalogue

local function http_get(server, path)
    local sock = ngx.socket.tcp()
    sock:settimeouts(cfg.connect_timeout * 1000, 10000, 10000)
    local ok, err = sock:connect(server.ip, server.port)
    if not ok then
        return nil, err
    end
    ok, err = sock:send("GET " .. path .. " HTTP/1.0\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
    if not ok then
        sock:close()
        return nil, err
    end
    local data
    data, err = sock:receive("*a")
    sock:close()
    if not data then
        return nil, err
    end
    local status = tonumber(data:match("^HTTP/%d%.%d (%d+)"))
    local body = data:match("\r\n\r\n(.*)$")
    if status ~= 200 or not body then
        return nil, "status " .. tostring(status)
    end
    return cjson.decode(body)
end

local function live_servers()
    local list = {}
    for _, server in ipairs(cfg.servers) do
        if not server.down then
            list[#list + 1] = server
        end
    end
    return list
end

local function gather(path)
    local servers = live_servers()
    local threads = {}
    for index, server in ipairs(servers) do
        threads[index] = ngx.thread.spawn(http_get, server, path)
    end
    local results = {}
    for index, thread in ipairs(threads) do
        local ok, doc = ngx.thread.wait(thread)
        if ok and type(doc) == "table" then
            results[#results + 1] = { server = servers[index], doc = doc }
        end
    end
    return results
end

-- Every model of the plan's pools once (a model an instance still has on disk but no pool serves is left out:
-- the gateway would answer 404 for it): of the instances' entries for one model, the smallest canonical text
-- (the same answer whichever instance answered first), in name order.
local function merge_unique(results, list_field, name_of)
    local best, names = {}, {}
    for _, r in ipairs(results) do
        for _, m in ipairs(type(r.doc[list_field]) == "table" and r.doc[list_field] or {}) do
            local key = type(m) == "table" and _M.model_key(name_of(m))
            if key and cfg.pools[key] then
                local text = canonical(m)
                if not best[key] then
                    names[#names + 1] = key
                    best[key] = text
                elseif text < best[key] then
                    best[key] = text
                end
            end
        end
    end
    table.sort(names)
    local items = {}
    for index, key in ipairs(names) do
        items[index] = best[key]
    end
    return items
end

local function merge_tags(results)
    return encode_list("models", merge_unique(results, "models", function(m) return m.name or m.model end))
end

local function merge_openai(results)
    return encode_list("data", merge_unique(results, "data", function(m) return m.id end), '"object":"list",')
end

local function merge_ps(results)
    local models = {}
    for _, r in ipairs(results) do
        for _, m in ipairs(type(r.doc.models) == "table" and r.doc.models or {}) do
            local key = type(m) == "table" and _M.model_key(m.name or m.model)
            if key and cfg.pools[key] then
                m.herd_instance = r.server.key
                -- Backend addresses only with gateway_expose_upstream (loopback clients have /herd/pools).
                m.herd_endpoint = cfg.expose_upstream and r.server.endpoint or nil
                models[#models + 1] = m
            end
        end
    end
    table.sort(models, function(a, b)
        if a.herd_instance ~= b.herd_instance then
            return a.herd_instance < b.herd_instance
        end
        return tostring(a.name) < tostring(b.name)
    end)
    return encode_list("models", models)
end

local CATALOGUE = {
    ["/api/tags"] = { merge = merge_tags, ttl = "catalogue_ttl" },
    ["/v1/models"] = { merge = merge_openai, ttl = "catalogue_ttl" },
    ["/api/ps"] = { merge = merge_ps, ttl = 1 },
}

-- content_by_lua of /api/tags, /v1/models and /api/ps: the whole cluster's answer, cached briefly in the
-- shared dict so every worker gives the same one.
function _M.catalogue()
    local path = ngx.var.uri
    local entry = CATALOGUE[path]
    local allowed = endpoints.find(cfg.endpoints, path)
    if not allowed then
        return answer(404, "this path is not served by the herd gateway")
    end
    if not allowed.methods[ngx.req.get_method()] then
        return answer(405, "method not allowed on " .. path)
    end
    local d = dict()
    local cached = d:get("c:" .. path)
    if not cached then
        local results = gather(path)
        if #results == 0 then
            ngx.var.herd_pool = "*"
            return answer(502, "no herd instance answered " .. path .. "; please try again")
        end
        cached = entry.merge(results)
        local ttl = type(entry.ttl) == "number" and entry.ttl or cfg[entry.ttl]
        if ttl > 0 then
            d:set("c:" .. path, cached, ttl)
        end
    end
    ngx.header["Content-Type"] = "application/json; charset=utf-8"
    ngx.say(cached)
end

return _M
