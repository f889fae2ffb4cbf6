-- herd gateway: conversation affinity (a conversation goes back to the instance that holds its context).
--
-- Owns: key (the conversation key of a request), lookup and remember (the map, in its own dict so that its
-- least-recently-used eviction never touches the slots). The load bound is slots.acquire's.
-- Shared-dict keys (herd_affinity):
--   s:<md5>   read, written: the instance of the conversation named by the session header
--   p:<md5>   read, written: the instance of the conversation with this model and prompt prefix
local cjson = require("cjson.safe")
local endpoints = require("herd_gateway.endpoints")
local keys = require("herd_gateway.keys")
local settings = require("herd_gateway.settings")

local _M = {}

-- Conversation key: the explicit session header, else the model and the first bytes of what every turn of a
-- conversation resends unchanged (chat: the messages up to the first user message; completion: system + prompt).
_M.HEADER = "http_x_herd_session"
local PREFIX_BYTES = 1024

-- The conversation key of a request (nil: no affinity), from the model, the path, the decoded body and the
-- session header. Two turns of one chat resend the same first messages, so they get the same key. `tenant` (the
-- API key name) is part of every key: one tenant cannot probe which prompts another has cached.
function _M.key(model, path, doc, session, tenant)
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
    return "p:" .. ngx.md5(model .. "\0" .. text:sub(1, PREFIX_BYTES))
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
