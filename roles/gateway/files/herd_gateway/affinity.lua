-- herd gateway: conversation affinity (a conversation goes back to the instance that holds its context).
--
-- Owns: MEMBERS, session_header and key (the conversation key of a request), lookup and remember (the map, in its
-- own dict so that its least-recently-used eviction never touches the slots). The load bound is slots.acquire's.
-- Shared-dict keys (herd_affinity):
--   s:<md5>   read, written: the instance of the conversation named by the session header
--   p:<md5>   read, written: the instance of the conversation with this model and prompt prefix
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
        return { (type(doc.system) == "string" and doc.system or "") .. "\0" .. doc.prompt }
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
-- which prompts another has cached.
function _M.key(model, path, doc, session, tenant)
    model = (tenant or "") .. "\0" .. model
    if type(session) == "table" then
        session = session[1]
    end
    if type(session) ~= "string" or session == "" then
        session = body_session(doc)
    end
    if session then
        return "s:" .. ngx.md5(model .. "\0" .. session)
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

return _M
