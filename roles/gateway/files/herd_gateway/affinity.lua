-- herd gateway: cache affinity (a request goes where its prompt's prefix is cached: Ollama's runner reuses the
-- prompt a slot processed last, so the instance that served a prefix answers with a short prefill).
--
-- Owns: MEMBERS, session_header, key (the conversation key), chain (the request's prefix cut into blocks, each
-- block's hash chained to the one before), plan (what a request prefers: the session's instance, then the
-- instances that served the longest part of its chain), record (remember where a request went), lookup and
-- remember (one key), mark, settle and await (a burst of new sessions of one agent: one of them waits for the
-- first one's prefill to end where it runs instead of evaluating the same prefix elsewhere). The map lives in its
-- own dict so that its least-recently-used eviction never touches the slots. The load bound (a free slot,
-- gateway_prefix_max_imbalance) is slots.acquire's.
-- Modes (gateway_affinity): "prefix" (default) walks the chain; "conversation" makes the chain one block, the
-- conversation key (model + the first messages), which is how herd routed before prefix routing; a session
-- identifier pins its conversation in both.
-- Shared-dict keys (herd_affinity):
--   s:<md5>   read, written: the instance of the conversation named by the session header
--   p:<md5>   read, written: the instance of the conversation with this model and prompt prefix
--   h:<hash>  read, written: the instances that served a chain ending in this block, most recent first
--   x:<hash>  read, written: the pending mark of a request in flight evaluating this block (its id)
--   xa:<id>   read, written, deleted: mark <id>'s request is in flight (its instance's key)
--   xw:<id>   read, written: a request waits for mark <id>'s request (one at most)
-- Shared-dict keys (herd_gateway):
--   g:<key>   read, written: the sequence number of the last request sent to instance <key> with a chain
--   gb:<key>  read, written: the prompt bytes of the requests sent to instance <key> with a chain
--   x:id      read, written: the last pending mark's id (counters.incr)
local counters = require("herd_gateway.counters")
local endpoints = require("herd_gateway.endpoints")
local keys = require("herd_gateway.keys")
local respond = require("herd_gateway.respond")
local settings = require("herd_gateway.settings")

local _M = {}

-- Conversation key: a session identifier the client sends, else the model and the first bytes of what every turn
-- of a conversation resends unchanged. Session identifiers, the first one present wins (docs/gateway.md):
--   1. headers: X-Herd-Session (herd's own), X-Session-Affinity (opencode), X-Claude-Code-Session-Id (Claude Code),
--      session_id (Codex);
--   2. body members: prompt_cache_key (OpenAI), metadata.user_id (Anthropic; Claude Code puts its session there),
--      user (OpenAI).
-- The stable prefix, by the endpoint's affinity kind:
--   chat       the messages up to the first user message (/api/chat, /v1/chat/completions);
--   prompt     system + prompt (/api/generate, /v1/completions);
--   messages   system + tools + the messages up to the first user message (/v1/messages);
--   responses  instructions + tools + the input up to its first user message (/v1/responses).
_M.HEADERS = { "http_x_herd_session", "http_x_session_affinity", "http_x_claude_code_session_id", "http_session_id" }
-- The body members key() reads (the access handler hands their values over, read as Ollama reads them).
_M.MEMBERS = { "messages", "prompt", "system", "instructions", "input", "tools", "prompt_cache_key", "metadata",
    "user" }
local PREFIX_BYTES = 1024

-- The first of `count` values that is a non-empty string (a header given twice counts by its first value), or nil.
local function first_text(values, count)
    for index = 1, count do  -- not ipairs: it stops at the first absent value
        local value = values[index]
        if type(value) == "table" then
            value = value[1]
        end
        if type(value) == "string" and value ~= "" then
            return value
        end
    end
    return nil
end

-- The first session header the request carries, or nil.
function _M.session_header()
    local values = {}
    for index, name in ipairs(_M.HEADERS) do
        values[index] = ngx.var[name]
    end
    return first_text(values, #_M.HEADERS)
end

-- The session identifier in the body (prompt_cache_key, metadata.user_id, user), or nil.
local function body_session(doc)
    local metadata = doc.metadata
    return first_text({ doc.prompt_cache_key, type(metadata) == "table" and metadata.user_id or nil, doc.user }, 3)
end

-- A message's content (or a system prompt) as text: a string as it is; a list of blocks as the text of its text
-- blocks and the canonical JSON of the others, joined (as Ollama joins text blocks: "agent" and [{"type": "text",
-- "text": "agent"}] are the same prompt).
local function text_of(content)
    if type(content) == "string" then
        return content
    elseif type(content) ~= "table" then
        return ""
    end
    local parts = {}
    for index, block in ipairs(content) do
        parts[index] = (type(block) == "table" and block.type == "text" and type(block.text) == "string") and block.text
            or respond.canonical(block)
    end
    return table.concat(parts)
end

-- The messages of a conversation up to its first user message, as "role\0content" parts.
local function up_to_first_user(list, parts)
    if type(list) ~= "table" then
        return parts
    end
    for _, m in ipairs(list) do
        if type(m) ~= "table" then
            break
        end
        parts[#parts + 1] = tostring(m.role) .. "\0" .. text_of(m.content)
        if m.role == "user" then
            break
        end
    end
    return parts
end

-- The stable prefix of the request (a list of parts, empty when there is none).
local function stable_prefix(kind, doc)
    if kind == "chat" then
        return up_to_first_user(doc.messages, {})
    elseif kind == "prompt" then
        if type(doc.prompt) ~= "string" or doc.prompt == "" then
            return {}
        end
        return { (type(doc.system) == "string" and doc.system or "") .. "\0" .. doc.prompt:sub(1, PREFIX_BYTES) }
    end
    -- messages, responses: the system text and the tools (hashed: a long list of schemas), each part cut to
    -- PREFIX_BYTES so that the first user message always counts.
    local parts = {
        text_of(kind == "messages" and doc.system or doc.instructions):sub(1, PREFIX_BYTES),
        type(doc.tools) == "table" and ngx.md5(respond.canonical(doc.tools)) or "",
    }
    local first = kind == "messages" and doc.messages or doc.input
    if type(first) == "string" then
        parts[#parts + 1] = first:sub(1, PREFIX_BYTES)
    else
        local before = #parts
        up_to_first_user(first, parts)
        for index = before + 1, #parts do
            parts[index] = parts[index]:sub(1, PREFIX_BYTES)
        end
        if #parts == before then
            return {}
        end
    end
    return parts
end

-- The conversation key of a request (nil: no affinity), from the model, the path, the decoded body (the members
-- affinity reads) and the session header (session_header()). Two turns of one conversation resend the same first
-- messages, so they get the same key. `tenant` (the API key name) is part of every key: one tenant cannot probe
-- which prompts another has cached. `session_only`: nil unless the request names a session.
function _M.key(model, path, doc, session, tenant, session_only)
    model = (tenant or "") .. "\0" .. model
    if type(session) == "table" then
        session = session[1]
    end
    if type(session) ~= "string" or session == "" then
        session = body_session(doc)
    end
    if session then
        return "s:" .. ngx.md5(model .. "\0" .. session)
    elseif session_only then
        return nil
    end
    local kind = endpoints.AFFINITY_PATHS[path]
    if not kind then
        return nil
    end
    local text = table.concat(stable_prefix(kind, doc), "\0")
    if text == "" then
        return nil
    end
    if kind == "chat" or kind == "prompt" then
        text = text:sub(1, PREFIX_BYTES)
    end
    return "p:" .. ngx.md5(model .. "\0" .. text)
end

-- The instance that served the conversation last, or nil.
function _M.lookup(key)
    local value = keys.affinity():get(key)
    return value and settings.cfg.by_key[value] or nil
end

-- Remember the instance of a conversation (a full zone drops the least recently used entries).
function _M.remember(key, server)
    keys.affinity():set(key, server.key, settings.cfg.affinity_ttl)
end

-- The parts of a request's prompt in the order the model reads them, by the endpoint's affinity kind: the system
-- text, the tools (canonical JSON), then every message (role, text, tool calls); a later turn of a conversation
-- resends the earlier ones unchanged, so its parts begin with the parts of every earlier turn. A part is a small
-- head (its kind or role) and its text, kept apart so that a long text is never copied whole.
local function message_parts(parts, m)
    if type(m) ~= "table" then
        parts[#parts + 1] = { "item", respond.canonical(m) }
        return
    end
    if m.role == nil then
        parts[#parts + 1] = { "item", respond.canonical(m) }
        return
    end
    parts[#parts + 1] = { tostring(m.role), text_of(m.content) }
    if type(m.tool_calls) == "table" then
        parts[#parts + 1] = { "calls", respond.canonical(m.tool_calls) }
    end
end

local function prompt_parts(kind, doc)
    local parts = {}
    if kind == "prompt" then
        parts[1] = { "system", type(doc.system) == "string" and doc.system or "" }
        local prompt = doc.prompt
        parts[2] = { "prompt", type(prompt) == "string" and prompt or respond.canonical(prompt) }
        return parts
    end
    local list = (kind == "responses") and doc.input or doc.messages
    local rest = 1
    if kind == "messages" or kind == "responses" then
        parts[1] = { "system", text_of(kind == "messages" and doc.system or doc.instructions) }
    elseif type(list) == "table" and type(list[1]) == "table" and list[1].role == "system" then
        message_parts(parts, list[1])
        rest = 2
    end
    -- The tools after the system prompt, as the models' templates render them.
    if type(doc.tools) == "table" then
        parts[#parts + 1] = { "tools", respond.canonical(doc.tools) }
    end
    if type(list) == "string" then
        parts[#parts + 1] = { "user", list }
    elseif type(list) == "table" then
        for index = rest, #list do
            message_parts(parts, list[index])
        end
    end
    return parts
end

-- The request's chain: its prompt parts cut into blocks of gateway_prefix_block_bytes (a part's last block may
-- be shorter: blocks end where parts end, so the blocks of an earlier turn are exactly the first blocks of the
-- next), at most gateway_prefix_max_blocks. Block i's hash covers the tenant, the model and blocks 1..i (md5 of
-- the previous hash and the block; a part's first block also covers its head). Returns the hashes and the prompt
-- bytes each covers (nil when no block).
function _M.chain(model, path, doc, tenant)
    local kind = endpoints.AFFINITY_PATHS[path]
    if not kind then
        return nil
    end
    local cfg = settings.cfg
    local size, max_blocks = cfg.prefix_block_bytes, cfg.prefix_max_blocks
    local hashes, bytes = {}, {}
    local h = ngx.md5_bin((tenant or "") .. "\0" .. model)
    local total = 0
    for _, part in ipairs(prompt_parts(kind, doc)) do
        local head, text = part[1], part[2]
        local first = 1
        -- An empty part (no system prompt, an empty message) adds no block: a prefix nothing was cached for would
        -- draw every request without one to the same instance.
        while first <= #text do
            if #hashes >= max_blocks then
                return hashes, bytes
            end
            local piece = text:sub(first, first + size - 1)
            h = ngx.md5_bin(first == 1 and (h .. "\30" .. head .. "\0" .. piece) or (h .. piece))
            total = total + #piece
            hashes[#hashes + 1] = h
            bytes[#bytes + 1] = total
            first = first + size
        end
    end
    if #hashes == 0 then
        return nil
    end
    return hashes, bytes
end

-- How many instances a block remembers.
local PER_BLOCK = 3

-- An instance's prompt cache is its slots: each request it serves overwrites one slot's (Ollama's runner takes the
-- free slot with the longest shared prefix, else the least recently used), so they hold about the prompts of its
-- last num_parallel requests. Ollama 0.30+ (llama-server) also keeps the prompts its slots gave up in host memory,
-- oldest dropped first when over --cache-ram: about the last gateway_prefix_host_cache_bytes of prompt it served.
-- Every request sent to an instance takes the next number of its sequence (g:<key>) and adds its prompt bytes to
-- the instance's byte count (gb:<key>); a block's record names the instances with both as they were after that
-- request, and counts as cached on an instance while the number is among the instance's last num_parallel or the
-- instance has served at most gateway_prefix_host_cache_bytes since (prefix mode; conversation mode, herd's rule
-- before prefix routing, ignores it). With gateway_prefix_host_cache_bytes 0 (Ollama before 0.30: no host cache) the
-- byte count is neither kept nor read.
local function position(key, host)
    local d = keys.gateway()
    return { d:get("g:" .. key) or 0, host > 0 and (d:get("gb:" .. key) or 0) or 0 }
end

-- The instances a block's record names that still hold it, most recent first: a list of { key, seq }. `now` caches
-- the instances' sequence numbers for one plan.
local function served(d, hash, now)
    local value = d:get("h:" .. hash)
    if not value then
        return nil
    end
    local by_key = settings.cfg.by_key
    local check = settings.cfg.affinity == "prefix"
    local host = settings.cfg.prefix_host_cache_bytes or 0
    local list = {}
    for key, seq, served_bytes in value:gmatch("([^%s@]+)@(%d+)@?(%d*)") do
        seq = tonumber(seq)
        served_bytes = tonumber(served_bytes) or 0
        local server = by_key[key]
        if server and check then
            local current = now[key]
            if not current then
                current = position(key, host)
                now[key] = current
            end
            if seq <= current[1] - server.num_parallel and (host == 0 or current[2] - served_bytes > host) then
                server = nil  -- its slots have served num_parallel other requests since, and its host cache more
            end
        end
        if server then
            list[#list + 1] = { key, seq, served_bytes }
        end
    end
    return list
end

-- A request's pending marks: the blocks of its chain past what was cached where it went, while the instance
-- evaluates them (from its admission to the end of its answer: llama-server reuses a prompt only from an idle slot
-- or its host cache, so not while the answer streams), and only when they are worth a wait (PENDING_MIN seconds of
-- prefill at gateway_prefix_prefill_rate). A marked request records where its chain is at the end of its answer,
-- not at its first byte (herd_gateway.log): until then another slot of its instance would evaluate it again.
local PENDING_MIN = 0.25
-- How long a pending mark lasts at most (an answer that streams longer is no longer waited for).
local PENDING_TTL = 60

-- Fill plan.preferred (the session's instance pinned; then the instances that hold the longest cached part of the
-- chain, then those of a shorter part; slots.acquire tries them longest first, the least loaded first among
-- equals), plan.cached (the depth of the longest cached part) and plan.pending (below) from the plan's session
-- and chain.
-- The longest cached part is found by bisection over the chain (a chain is recorded whole, so its cached blocks
-- are a prefix of it), then the deepest block naming other instances by a second one: O(log n) dict reads.
-- plan.pending: { id, wait } when a request now in flight is evaluating a longer part of this chain than any
-- instance holds (an agent's new sessions in a burst: the first one's answer is not over), that part is worth
-- PENDING_MIN or more, and nobody waits for it yet (await). The wait is at most what that part saves: its bytes
-- over gateway_prefix_prefill_rate (no other cap: the waiter holds no one up; gateway_prefix_max_wait 0 turns it
-- off).
local function fill(plan)
    local cfg = settings.cfg
    local by_key = cfg.by_key
    plan.preferred, plan.pending = {}, nil
    local seen = {}
    local now = {}
    local function prefer(key, pin, bytes)
        local server = key and by_key[key]
        if server and not seen[key] then
            seen[key] = true
            plan.preferred[#plan.preferred + 1] = { server = server, pin = pin, bytes = bytes }
        end
    end
    if plan.session then
        prefer(keys.affinity():get(plan.session), true, 0)
    end
    local hashes, bytes = plan.chain, plan.bytes
    if not hashes then
        return
    end
    local d = keys.affinity()
    local function held(depth, another)
        for _, entry in ipairs(served(d, hashes[depth], now) or {}) do
            if not another or not seen[entry[1]] then
                return true
            end
        end
        return false
    end
    local function deepest(lo, hi, test)
        while lo < hi do
            local mid = math.floor((lo + hi + 1) / 2)
            if test(mid) then
                lo = mid
            else
                hi = mid - 1
            end
        end
        return lo
    end
    local depth = deepest(0, #hashes, function(mid) return held(mid, false) end)
    plan.cached = depth
    if bytes and #plan.preferred == 0 and (cfg.prefix_max_wait or 0) > 0 then
        -- The marks of one request are contiguous past what was cached for it: a second bisection past ours.
        local function pending(mid)
            local id = d:get("x:" .. hashes[mid])
            return id and d:get("xa:" .. id) and id
        end
        local deep = deepest(depth, #hashes, pending)
        local id = deep > depth and pending(deep)
        local wait = id and (bytes[deep] - (bytes[depth] or 0)) / cfg.prefix_prefill_rate
        if id and wait >= PENDING_MIN and not d:get("xw:" .. id) then
            plan.pending = { id = id, wait = wait }
        end
    end
    if depth == 0 then
        return
    end
    for _, entry in ipairs(served(d, hashes[depth], now) or {}) do
        prefer(entry[1], false, bytes and bytes[depth] or 0)
    end
    -- The runners-up: the deepest block held by another instance (a second bisection).
    depth = deepest(0, depth - 1, function(mid) return held(mid, true) end)
    if depth > 0 then
        for _, entry in ipairs(served(d, hashes[depth], now) or {}) do
            prefer(entry[1], false, bytes and bytes[depth] or 0)
        end
    end
end

-- What the request prefers, from its session identifier and its chain: { session = key, chain, bytes, cached,
-- preferred = { {server, pin, bytes}, ... }, pending } (fill, above), or nil when the request has neither.
function _M.plan(model, path, doc, session, tenant)
    local cfg = settings.cfg
    local plan = { preferred = {} }
    plan.session = _M.key(model, path, doc, session, tenant, true)
    local hashes, bytes
    if cfg.affinity == "conversation" then
        local key = not plan.session and _M.key(model, path, doc, nil, tenant)
        if key then
            hashes, bytes = { key }, { 0 }
        end
    else
        hashes, bytes = _M.chain(model, path, doc, tenant)
    end
    if not hashes and not plan.session then
        return nil
    end
    -- The prompt bytes of each block (prefix mode only: the conversation key is no prefix of known length).
    plan.chain, plan.bytes = hashes, hashes and cfg.affinity == "prefix" and bytes or nil
    fill(plan)
    return plan
end

-- Plan again from the records as they are now (after a pending wait, and while a request waits in its queue: an
-- instance may have recorded its prompt since, another may have served others over it); no pending wait.
function _M.refresh(plan)
    fill(plan)
    plan.pending = nil
end

-- Wait for the request the plan's pending names (one waiter each: the slot that request frees holds the prompt)
-- to finish, at most plan.pending.wait seconds (what its prefill would save this one), then plan again. Returns
-- whether it waited. The request waits before it takes a ticket in its queue: it holds nobody up.
function _M.await(plan)
    local pending = plan.pending
    plan.pending = nil
    if not pending then
        return false
    end
    local d = keys.affinity()
    if not d:safe_add("xw:" .. pending.id, 1, PENDING_TTL) then
        return false  -- another request waits for it (or the dict is full: no wait)
    end
    ngx.update_time()
    local deadline = ngx.now() + pending.wait
    while d:get("xa:" .. pending.id) do
        ngx.update_time()
        local left = deadline - ngx.now()
        if left <= 0 then
            break
        end
        ngx.sleep(math.min(0.01, left))
    end
    _M.refresh(plan)
    return true
end

-- The request was admitted to `server`: mark the blocks of its chain past what was cached for it as pending
-- there (fill), when they are worth a wait; the mark stays until settle (its log phase). Returns the mark's id.
function _M.mark(plan, server)
    local cfg = settings.cfg
    local bytes = plan.bytes
    if not bytes or (cfg.prefix_max_wait or 0) <= 0 then
        return nil
    end
    local matched, from = _M.matched(plan, server), 0
    for depth = math.min(plan.cached or 0, #bytes), 1, -1 do
        if bytes[depth] == matched then
            from = depth
            break
        end
    end
    if (bytes[#bytes] - (bytes[from] or 0)) / cfg.prefix_prefill_rate < PENDING_MIN then
        return nil
    end
    local id = counters.incr("x:id", 1)
    if not id then
        return nil
    end
    local d = keys.affinity()
    local ttl = PENDING_TTL
    if not d:safe_set("xa:" .. id, server.key, ttl) then
        return nil
    end
    for depth = from + 1, #plan.chain do
        d:safe_set("x:" .. plan.chain[depth], id, ttl)
    end
    return id
end

-- Log phase of a marked request: its answer is over, its prompt is cached where it went.
function _M.settle(id)
    if id then
        keys.affinity():delete("xa:" .. id)
    end
end

-- Remember where a request went: its session's instance, and the instance, with the request's number in its
-- sequence, as the most recent holder of every block of its chain (a full zone drops the least recently used
-- entries: a cache, nothing depends on it).
function _M.record(plan, server)
    local d = keys.affinity()
    local ttl = settings.cfg.affinity_ttl
    if plan.session then
        d:set(plan.session, server.key, ttl)
    end
    if not plan.chain then
        return
    end
    local seq = counters.incr("g:" .. server.key, 1) or 0
    local now = {}
    local mine = server.key .. "@" .. seq
    local keep_bytes = (settings.cfg.prefix_host_cache_bytes or 0) > 0
    if keep_bytes then
        mine = mine .. "@" .. (counters.incr("gb:" .. server.key, plan.bytes and plan.bytes[#plan.bytes] or 0) or 0)
    end
    for _, hash in ipairs(plan.chain) do
        local list = { mine }
        for _, entry in ipairs(served(d, hash, now) or {}) do
            if entry[1] ~= server.key and #list < PER_BLOCK then
                list[#list + 1] = entry[1] .. "@" .. entry[2] .. (keep_bytes and "@" .. entry[3] or "")
            end
        end
        d:set("h:" .. hash, table.concat(list, " "), ttl)
    end
end

-- The prompt bytes the chosen server had cached by the plan (0: none).
function _M.matched(plan, server)
    for _, entry in ipairs(plan.preferred) do
        if entry.server == server then
            return entry.bytes
        end
    end
    return 0
end

return _M
