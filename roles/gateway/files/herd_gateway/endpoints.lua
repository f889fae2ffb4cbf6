-- herd gateway: the endpoints the gateway forwards, and how each is treated.
--
-- Owns: the endpoint index built from role gateway's table (_gateway_endpoints, passed in the settings: path,
-- methods, the member naming the model, dialect, the Ollama release it came from, kind, body limit, affinity,
-- usage family),
-- find() (the entry of a request path; every other path is refused 404 without touching an instance), and ANY.
-- AFFINITY_PATHS (path -> chat/prompt/messages/responses) is derived from the same table at every (re)load.
-- Shared-dict keys: none.
local _M = {}

-- The pool of requests that name no model: every instance, least loaded, no slot taken.
_M.ANY = "*"

-- Where the conversation is (affinity.key): "chat", "prompt", "messages" or "responses".
_M.AFFINITY_PATHS = {}

local KINDS = { native = true, compat = true, show = true, catalogue = true, any = true }

-- The index of the table (a list of entries as role gateway renders them); errors name the bad entry.
function _M.index(list)
    local index = { exact = {}, prefixes = {}, affinity = {} }
    for position, e in ipairs(list or {}) do
        if type(e) ~= "table" or type(e.path) ~= "string" or e.path:sub(1, 1) ~= "/" or type(e.methods) ~= "table"
            or not KINDS[e.kind] then
            error("herd gateway: endpoint " .. position .. " of the settings is malformed")
        end
        local entry = {
            path = e.path, methods = {}, model = e.model or "", kind = e.kind, body = e.body or "small",
            dialect = e.dialect, affinity = (e.affinity ~= nil and e.affinity ~= "") and e.affinity or nil,
            usage = (e.usage ~= nil and e.usage ~= "") and e.usage or nil,
        }
        for _, method in ipairs(e.methods) do
            entry.methods[method] = true
        end
        local prefix = e.path:match("^(.*){model}$")
        if prefix then
            entry.prefix = prefix
            index.prefixes[#index.prefixes + 1] = entry
        else
            index.exact[e.path] = entry
        end
        if entry.affinity then
            index.affinity[e.path] = entry.affinity
        end
    end
    return index
end

-- Use `index` from now on (init at every start and reload; tests).
function _M.configure(index)
    _M.AFFINITY_PATHS = index.affinity
end

-- The entry of a (normalised) request path and, for a "{model}" path, the model named by its last segment; nil
-- for a path the gateway does not forward. Exact match: nginx compares paths with regard to case, so does Ollama.
function _M.find(index, uri)
    local entry = index.exact[uri]
    if entry then
        return entry
    end
    for _, candidate in ipairs(index.prefixes) do
        local prefix = candidate.prefix
        if #uri > #prefix and uri:sub(1, #prefix) == prefix then
            local rest = uri:sub(#prefix + 1)
            if not rest:find("/", 1, true) then
                return candidate, rest
            end
        end
    end
    return nil
end

return _M
