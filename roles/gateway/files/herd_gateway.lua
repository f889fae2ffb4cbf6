-- herd gateway: model pools, slots, the fair wait queue and the cluster catalogue inside nginx (lua-nginx-module).
--
-- The entry points role gateway's nginx configuration calls (init_by_lua, access, balancer, header filter, log,
-- content of /herd/pools and of the catalogue paths); the work is done by the modules under herd_gateway/:
--   keys        the shared dicts and the one list of every key shape they hold (KEYS)
--   counters    n:, w:, k: keys: counters over every worker with each worker's share (a dead worker's is given
--               back), writes that never evict, the dicts' free space
--   names       model_key: Ollama's model-name rule (the pool of a request), a port of ollama_names.py
--   endpoints   the endpoint table's index (find: which paths are forwarded, how), AFFINITY_PATHS, ANY
--   apikeys     the API key record and the key name of a request (set_by_lua of $herd_key_name)
--   settings    init/build/configure: settings, servers.json, drained.json, DNS -> settings.cfg
--   slots       i:, f:, r:, p:, d: keys: a slot per request on an instance, failures, least-loaded candidates,
--               progress (last upstream byte), the runtime drained flags
--   queue       q: keys: the FIFO of every pool (its markers in herd_queue), admit, on_abort
--   stats       s: keys: counters and the wait histogram of /herd/pools
--   affinity    herd_affinity: prompt-prefix blocks and sessions -> instances (cache affinity)
--   body        read_body, the JSON member scanner, view (members as Ollama reads them), rewrite
--   respond     canonical JSON, error and busy answers in the dialect of the request's API
--   usage       u: keys: token counts of every answer read as it streams (the access log's token fields), the
--               per-key token window
--   tenants     e: keys: the per-key limits (models, requests in flight plus queued, tokens per minute)
--   catalogue   c: keys: /api/tags, /v1/models, /api/ps merged over every live instance
--   status      /herd/pools, and /herd/admin/drained (the drain command's loopback admin location)
--
-- Loaded by init_by_lua (nginx master, at every start and reload) with the settings rendered by role gateway.
-- The servers come from the gateway host's record (servers.json, written by the role) and the drained ones
-- from drained.json plus gateway_drain: applied at every start and reload, and at runtime by the admin location
-- (herd-gateway-drain writes drained.json, then POSTs /herd/admin/drained: every worker follows at once).
-- check (init_by_lua under herd-nginx-check, HERD_GATEWAY_CHECK=1): the same init on candidate records, then exit.
-- Shared-dict keys: none of its own (through slots, queue and affinity).
local cjson = require("cjson.safe")
local affinity = require("herd_gateway.affinity")
local apikeys = require("herd_gateway.apikeys")
local body = require("herd_gateway.body")
local catalogue = require("herd_gateway.catalogue")
local counters = require("herd_gateway.counters")
local endpoints = require("herd_gateway.endpoints")
local names = require("herd_gateway.names")
local queue = require("herd_gateway.queue")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")
local slots = require("herd_gateway.slots")
local status = require("herd_gateway.status")
local tenants = require("herd_gateway.tenants")
local usage = require("herd_gateway.usage")

local _M = {}

local ANY = endpoints.ANY
local NGX_BUSY = -3  -- nginx's return code for "no live upstreams" (src/core/ngx_core.h)

-- init_by_lua: the settings role gateway renders (JSON text) and its endpoint table (one JSON text per endpoint);
-- the drained record becomes the shared flags.
--
-- `nginx -t` does not run init_by_lua. herd-nginx-check (the role's validate, and herd-gateway-drain before it
-- writes a record) therefore also starts nginx on its private copy of the configuration with HERD_GATEWAY_CHECK=1
-- (and HERD_GATEWAY_CHECK_SERVERS / HERD_GATEWAY_CHECK_DRAINED naming candidate records): this init loads them
-- with the very code a reload runs, refuses a drained record that is not a list of names, says what it loaded on
-- stderr and exits the process before nginx opens a socket. An error is nginx's "init_by_lua error" and status 1.
function _M.init(settings_json, endpoint_jsons)
    local check = os.getenv("HERD_GATEWAY_CHECK")
    local overrides = nil
    if check and check ~= "" then
        overrides = { servers_file = os.getenv("HERD_GATEWAY_CHECK_SERVERS"),
                      drained_file = os.getenv("HERD_GATEWAY_CHECK_DRAINED") }
    end
    settings.init(settings_json, endpoint_jsons, overrides)
    local doc = cjson.decode(settings_json)
    local drained_file = overrides and overrides.drained_file or doc.drained_file
    status.configure_admin(drained_file, doc.drain)
    local targets, err = status.drained_targets()
    if overrides then
        if not targets then
            error("herd gateway: " .. err)
        end
        local cfg = settings.cfg
        io.stderr:write(string.format("herd gateway: the settings and records load: %d servers, %d pools, %d drained\n",
            #cfg.servers, #cfg.pool_names, #targets))
        io.stderr:flush()
        os.exit(0)
    end
    if targets then
        slots.apply_drained(targets)
    end
end

-- init_worker_by_lua: this worker's record, and the timer that gives back what dead workers held.
function _M.init_worker()
    counters.register()
end

-- The body limit of an endpoint, checked on Content-Length before anything is read (and on the length read, for a
-- chunked body). Returns true, or answers 413 itself.
local function within_limit(entry, length)
    local limit = settings.cfg.body_max[entry.body]
    if limit and length and length > limit then
        respond.answer(413, "request body too large: " .. entry.path .. " takes at most " .. limit .. " bytes")
        return false
    end
    return true
end

-- The pool of a request for an endpoint that names a model, read as Ollama will read it (body.view); the body is
-- rewritten when herd changes it. Returns the pool, or answers 400/404/413 itself (and returns nil).
local function route(entry, path_model)
    local cfg = settings.cfg
    local ctx = ngx.ctx
    local name, view
    if entry.model == "path" then
        name = path_model
    else
        local text = body.read_body()
        if not text then
            return respond.answer(400, "the request body must be a JSON object naming a model")
        end
        if not within_limit(entry, #text) then
            return nil
        end
        local err
        view, err = body.view(text, cjson.decode(text))
        if not view then
            return respond.answer(400, err)
        end
        name = view.value("model")
        if (name == nil or name == "") and entry.model == "model|name" then
            name = view.value("name")
        end
    end
    if type(name) ~= "string" or name == "" then
        return respond.answer(400, "model is required")
    end
    local model = names.model_key(name)
    -- A model outside the API key's `models` is absent for that key.
    if not model or not cfg.pools[model] or not tenants.may_use(ngx.var.herd_key_name or "", model) then
        return respond.answer(404, 'model "' .. names.short_for_error(name) .. '" not found, try pulling it first')
    end
    if view then
        local options, err
        if entry.kind == "native" then
            options, err = body.options_members(view)
            if not options then
                return respond.answer(400, err)
            end
        end
        if cfg.affinity and entry.affinity then
            local doc = {}
            for _, member in ipairs(affinity.MEMBERS) do
                doc[member] = view.value(member)
            end
            ctx.herd_affinity = affinity.plan(model, entry.path, doc, affinity.session_header(),
                ngx.var.herd_key_name)
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

-- With API keys set, a request without a valid one: 401 (in its endpoint's dialect), before its body is read.
-- Returns true when the request may go on.
local function authorized()
    if apikeys.required() and (ngx.var.herd_key_name or "") == "" then
        ngx.header["WWW-Authenticate"] = 'Bearer realm="herd"'
        respond.answer(401, "unauthorized: missing or wrong API key")
        return false
    end
    return true
end

-- access_by_lua of the proxied locations. `mode`: "route" (the endpoints of the table: every other path answers
-- 404, another method 405, without touching an instance) or "any" (model management, when it is allowed).
function _M.access(mode)
    if not authorized() then
        return
    end
    slots.sync_drained()
    local pool = ANY
    local ctx = ngx.ctx
    local entry
    if mode == "route" then
        local path_model
        entry, path_model = endpoints.find(settings.cfg.endpoints, ngx.var.uri)
        if not entry or entry.kind == "catalogue" then
            return respond.answer(404, "this path is not served by the herd gateway")
        end
        -- Every answer the gateway writes from here on is in the endpoint's API dialect.
        ctx.herd_dialect = entry.dialect
        if not entry.methods[ngx.req.get_method()] then
            return respond.answer(405, "method not allowed on " .. entry.path)
        end
        local length = tonumber(ngx.var.http_content_length or "")
        if not within_limit(entry, length) then
            return
        end
        -- The bodies held in memory at once, over every worker, stay within gateway_body_memory: a burst of large
        -- bodies is answered busy instead of growing the workers.
        if entry.model ~= "" and entry.model ~= "path" then
            local held, err = body.hold(length or settings.cfg.body_max[entry.body] or 0, settings.cfg.body_memory)
            if err then
                ngx.log(ngx.ERR, "herd gateway: herd_gateway: ", err)
                return respond.answer(503, "server busy, please try again: the gateway's shared state is full",
                    settings.cfg.retry_after)
            elseif not held then
                return respond.busy("server busy, please try again: the gateway holds too many large requests")
            end
        end
        if entry.model ~= "" then
            pool = route(entry, path_model)
            if not pool then
                return
            end
            if ngx.ctx.herd_body_held and ngx.ctx.herd_body_held > 1048576 then
                -- The Lua copies of a large body (text, decoded document, rewritten text) are garbage now; free them
                -- before the request waits in the queue or streams for minutes.
                collectgarbage("collect")
                ngx.ctx.herd_body_collected = true
            end
        end
    end
    ngx.var.herd_pool = pool
    ctx.herd_pool = pool
    if pool == ANY then
        -- No model: any live instance, least loaded; no slot is taken (version, health, model list).
        local list = slots.candidates(ANY)
        if #list == 0 then
            return respond.busy("server busy, please try again: every herd instance is unavailable")
        end
        ctx.herd_server = list[1].server
        return
    end
    -- The key's own limits: over its requests in flight plus queued, or its tokens per minute: 429.
    if not tenants.admit(ngx.var.herd_key_name or "") then
        return
    end
    local ok, err = ngx.on_abort(queue.on_abort)
    if not ok and err ~= "duplicate call" then
        ngx.log(ngx.WARN, "herd gateway: on_abort: ", err)
    end
    local server = queue.admit(pool, ctx.herd_affinity, ngx.var.herd_key_name or "")
    ctx.herd_server = server
    ngx.var.herd_slot = server.key
    if settings.cfg.token_accounting then
        usage.start(ctx, entry and entry.usage)
    end
end

-- balancer_by_lua: the chosen instance first; on a retry another candidate of the same pool.
function _M.balance()
    local balancer = require("ngx.balancer")
    local cfg = settings.cfg
    local ctx = ngx.ctx
    local server = ctx.herd_server
    if not server then
        return ngx.exit(500)
    end
    if ctx.herd_tried then
        -- A retry: the last instance failed before sending a byte.
        local last = server
        slots.fail(last)
        ctx.herd_tried[last.key] = true
        local next_server
        if ctx.herd_pool == ANY then
            local list = slots.candidates(ANY, ctx.herd_tried)
            next_server = list[1] and list[1].server
        else
            -- Every slot of the pool taken: the retry waits in the least loaded instance's own queue
            -- (slots.overflow) rather than fail; the client's request never reached an answer.
            next_server = slots.acquire(ctx.herd_pool, ctx.herd_tried) or slots.overflow(ctx.herd_pool, ctx.herd_tried)
            if next_server then
                slots.give_back(last.key)
                ngx.var.herd_slot = next_server.key
            end
        end
        if not next_server then
            -- No other instance: nginx's "no live upstreams" (NGX_BUSY, passed through by lua-nginx-module's
            -- balancer), a 502 that error_page turns into @herd_unavailable's answer in Ollama's error shape.
            -- ngx.exit(502) here would be a bare 500: the balancer maps every HTTP status to NGX_ERROR.
            return ngx.exit(NGX_BUSY)
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
-- The answer's framing (stream or not) goes to its token meter.
function _M.header_filter()
    if ngx.status == 503 and not ngx.header["Retry-After"] then
        -- gateway_retry_after, not the pool's measured wait: the gateway does not see the instance's own queue.
        ngx.header["Retry-After"] = tostring(settings.cfg.retry_after)
    end
    usage.framing(ngx.ctx, ngx.header["Content-Type"])
end

-- body_filter_by_lua of the proxied locations: every chunk an instance sends is progress of that instance, and
-- is read by its token meter on its way (never held back). The first byte of a 200 records where the request's
-- prompt now is (cache affinity): only then has the instance evaluated it (an answer's first byte follows its
-- prefill); a request sent there while it is still evaluating would evaluate it again in another slot. A request
-- that evaluates a long prefix cold (affinity.mark) records at the end of its answer instead (log): until then
-- only its busy slot holds the prefix (llama-server reuses a prompt from an idle slot or its host cache), and of a
-- burst of one agent's new sessions one waits for that end (affinity.await), the others spread. An instance that
-- fails records nothing.
function _M.body_filter()
    local key = ngx.var.herd_slot
    if key ~= nil and key ~= "" then
        local data = ngx.arg[1]
        local ctx = ngx.ctx
        if data ~= "" then
            slots.progress(key)
            if ctx.herd_affinity and not ctx.herd_recorded and ngx.status == 200 and ctx.herd_server then
                ctx.herd_recorded = true
                if ctx.herd_pending then
                    ctx.herd_record_at_end = true  -- a long prefix evaluated cold: recorded when its answer ends
                else
                    affinity.record(ctx.herd_affinity, ctx.herd_server)
                end
            end
        end
        usage.chunk(ctx, data, ngx.arg[2])
    end
end

-- log_by_lua (every request, every path): give the slot back; the answer's tokens into the access log and the API
-- key's window; count a failure when the last attempt got no answer.
function _M.log()
    body.release()
    local ctx = ngx.ctx
    local key = ngx.var.herd_slot
    if key and key ~= "" then
        slots.give_back(key)
    end
    queue.done(ctx)
    if ctx.herd_record_at_end then
        ctx.herd_record_at_end = nil
        affinity.record(ctx.herd_affinity, ctx.herd_server)
    end
    affinity.settle(ctx.herd_pending)
    -- The answer's tokens (the access log's fields), counted against its API key's window.
    local tokens = usage.finish(ctx, ngx.req.start_time())
    tenants.done(ctx, tokens)
    local code = ngx.var.status
    local header_times = ngx.var.upstream_header_time
    if (code == "502" or code == "504") and header_times and header_times:match("%-$") then
        local addr = (ngx.var.upstream_addr or ""):match("([^, ]+)$")
        local server = addr and settings.cfg.by_endpoint[addr]
        if server then
            slots.fail(server)
        end
    end
end

-- content_by_lua of the error locations (error_page: nginx's own 413, 429 and 502): `status` and `message` in
-- the dialect of the request's endpoint, with Retry-After when given.
function _M.error_answer(status, message, retry_after)
    return respond.answer(status, message, retry_after)
end

-- content_by_lua of /herd/pools.
_M.pools_status = status.pools_status

-- content_by_lua of /herd/admin/drained.
_M.admin_drained = status.admin_drained

-- content_by_lua of /api/tags, /v1/models and /api/ps (over the instances not drained).
function _M.catalogue()
    if not authorized() then
        return
    end
    slots.sync_drained()
    return catalogue.serve()
end

return _M
