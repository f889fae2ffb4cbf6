-- herd gateway: model names as Ollama matches them.
--
-- Owns: model_key, the rule that turns a request's or an instance's model name into its pool name.
-- Shared-dict keys: none.
local _M = {}

local REGISTRY = "registry.ollama.ai"
local NAMESPACE = "library"

-- Ollama's name rule (types/model/name.go): [host/][namespace/]model[:tag][@digest], defaults
-- registry.ollama.ai, library, latest; compared without regard to case. Returns the short form Ollama shows
-- (`x:latest`, `ns/x:tag`, `host/ns/x:tag`) in lower case, or nil for an empty or malformed name.
-- The same rule is roles/gateway/filter_plugins/gateway.py:gateway_model_key (one case table tests both).
function _M.model_key(name)
    if type(name) ~= "string" then
        return nil
    end
    name = name:lower():gsub("^%s+", ""):gsub("%s+$", "")
    name = name:gsub("@.*$", "")
    if name == "" then
        return nil
    end
    local tag = "latest"
    local colon = name:match("^.*():")
    if colon and not name:sub(colon + 1):find("/", 1, true) then
        tag = name:sub(colon + 1)
        name = name:sub(1, colon - 1)
    end
    local parts = {}
    for part in (name .. "/"):gmatch("([^/]*)/") do
        parts[#parts + 1] = part
    end
    local host, namespace, model = REGISTRY, NAMESPACE, parts[#parts]
    if #parts == 2 then
        namespace = parts[1]
    elseif #parts >= 3 then
        host = table.concat(parts, "/", 1, #parts - 2)
        namespace = parts[#parts - 1]
    end
    if model == "" or tag == "" or namespace == "" or host == "" then
        return nil
    end
    if host == REGISTRY and namespace == NAMESPACE then
        return model .. ":" .. tag
    elseif host == REGISTRY then
        return namespace .. "/" .. model .. ":" .. tag
    end
    return host .. "/" .. namespace .. "/" .. model .. ":" .. tag
end

return _M
