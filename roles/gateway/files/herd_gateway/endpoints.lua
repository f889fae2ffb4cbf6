-- herd gateway: which Ollama endpoints name a model, and how each is treated.
--
-- Owns: MODEL_PATHS (endpoints routed by the model in their body, and how), AFFINITY_PATHS (endpoints whose body
-- carries a conversation) and ANY (the pool of requests that name no model). The catalogue's endpoints are
-- catalogue.lua's.
-- Shared-dict keys: none.
local _M = {}

-- The pool of requests that name no model: every instance, least loaded, no slot taken.
_M.ANY = "*"

-- POST bodies that name a model: "native" (Ollama API: forced options go into `options`), "openai" (no Ollama
-- options), "show" (the name may be in `name`).
_M.MODEL_PATHS = {
    ["/api/generate"] = "native", ["/api/chat"] = "native", ["/api/embed"] = "native",
    ["/api/embeddings"] = "native", ["/api/show"] = "show",
    ["/v1/chat/completions"] = "openai", ["/v1/completions"] = "openai", ["/v1/embeddings"] = "openai",
}

-- Where the conversation is: "chat" (the messages up to the first user message), "prompt" (system + prompt).
_M.AFFINITY_PATHS = {
    ["/api/chat"] = "chat", ["/v1/chat/completions"] = "chat",
    ["/api/generate"] = "prompt", ["/v1/completions"] = "prompt",
}

return _M
