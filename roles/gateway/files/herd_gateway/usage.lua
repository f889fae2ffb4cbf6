-- herd gateway: token accounting of every answer, from the usage the instance reports, without buffering it.
--
-- Owns: start (access: a request of an endpoint that reports usage gets a meter), chunk (body filter: each chunk
-- passes on unchanged and is scanned), finish (log phase: the request's token counts, time to first token and
-- time per output token go into the access log's variables: herd-exporter reads them from there), FIELDS (the
-- usage members of each family) and the per-key limits' token window (spent, add).
-- Every family names its two counts by member name (the endpoint table's `usage` column):
--   native  prompt_eval_count / eval_count           (Ollama's own API, streamed or not: the last record)
--   openai  usage.prompt_tokens / completion_tokens  (streamed: only with stream_options.include_usage)
--   io      usage.input_tokens / output_tokens       (Anthropic /v1/messages, OpenAI /v1/responses)
-- A member counts where JSON puts a member name: after "{" or "," (blanks allowed), never inside a string (a
-- quote in a string is always escaped); the last value seen wins (the final record comes last; an OpenAI stream
-- with include_usage carries zeros before the real figures). Each chunk is scanned together with the last CARRY
-- bytes of the one before, so a member cut by a chunk boundary is still read; nothing else is kept.
-- An answer is whole when its last buffer passed the body filter. One that is not (the client hung up, the
-- instance died mid-answer), and a whole stream that reported no usage (OpenAI without include_usage), count what
-- was delivered: output tokens are the records passed to the client (NDJSON lines, SSE data events: Ollama sends
-- one record per generated token, plus a few framing records) or the output reported so far if larger, prompt
-- tokens what the answer reported before it was cut (Anthropic's message_start), else 0; the log says
-- "delivered" instead of "reported". A count above MAX_TOKENS (a broken or hostile instance) is capped to it.
-- Shared-dict keys (herd_gateway):
--   u:<key>:<minute>  read, written: tokens the API key <key> spent in that minute (per-key limit, 120 s)
local counters = require("herd_gateway.counters")
local keys = require("herd_gateway.keys")

local _M = {}

_M.FIELDS = {
    native = { prompt = "prompt_eval_count", output = "eval_count" },
    openai = { prompt = "prompt_tokens", output = "completion_tokens" },
    io = { prompt = "input_tokens", output = "output_tokens" },
}

local CARRY = 64
local MAX_TOKENS = 100000000

-- The last value of member `name` in `text` (a JSON member, not text in a string), or nil.
local function last_member(text, name)
    if not text:find('"' .. name .. '"', 1, true) then
        return nil
    end
    local value
    for digits in text:gmatch('[,{]%s*"' .. name .. '"%s*:%s*(%d+)') do
        value = digits
    end
    if not value then
        return nil
    end
    if #value > 9 then
        return MAX_TOKENS
    end
    return math.min(tonumber(value), MAX_TOKENS)
end

-- access: a meter for an answer of usage family `family` (nil or "": the endpoint reports none).
function _M.start(ctx, family)
    local fields = family and _M.FIELDS[family]
    if fields then
        ctx.herd_usage = { fields = fields, carry = "", records = 0, sse_tail = "\n" }
    end
end

-- header filter: how the answer is framed (records of a stream are counted; a plain JSON answer is one).
function _M.framing(ctx, content_type)
    local u = ctx.herd_usage
    if not u then
        return
    end
    content_type = (content_type or ""):lower()
    if content_type:find("text/event-stream", 1, true) then
        u.sse = true
    elseif content_type:find("ndjson", 1, true) then
        u.ndjson = true
    end
end

-- body filter: scan one chunk (it passes on unchanged); `eof`: the answer's last buffer (it arrived whole).
function _M.chunk(ctx, data, eof)
    local u = ctx.herd_usage
    if not u then
        return
    end
    if eof then
        u.complete = true
    end
    if not data or data == "" then
        return
    end
    local now = ngx.now()
    u.first = u.first or now
    u.last = now
    local text = u.carry .. data
    local prompt = last_member(text, u.fields.prompt)
    if prompt then
        u.prompt = prompt
    end
    local output = last_member(text, u.fields.output)
    if output then
        u.output = output
    end
    if u.sse then
        -- A data line starts the answer or follows a line break; the last 5 bytes of the chunk before hold the
        -- start of one cut by the boundary (a match always ends in this chunk: it is never counted twice).
        local lines = u.sse_tail .. data
        local at = 1
        while true do
            local found = lines:find("\ndata:", at, true)
            if not found then
                break
            end
            u.records = u.records + 1
            at = found + 1
        end
        u.sse_tail = lines:sub(-5)
    elseif u.ndjson then
        local _, lines = data:gsub("\n", "")
        u.records = u.records + lines
    end
    u.carry = #text > CARRY and text:sub(-CARRY) or text
end

-- log phase: the request's figures into the access log's variables (empty when the endpoint reports no usage).
-- `started`: the request's start (ngx.req.start_time()).
function _M.finish(ctx, started)
    local u = ctx.herd_usage
    if not u then
        return nil
    end
    local stream = u.sse or u.ndjson
    local prompt, output, source = u.prompt or 0, u.output or 0, "reported"
    if not u.complete or (stream and u.prompt == nil and u.output == nil) then
        -- Cut (no last buffer), or a stream that reported nothing (OpenAI without include_usage): what was
        -- delivered. An Anthropic stream's message_start reports output_tokens 0 before the first token.
        output, source = math.max(output, u.records), "delivered"
    end
    local var = ngx.var
    var.herd_tokens_prompt = prompt
    var.herd_tokens_output = output
    var.herd_tokens_from = source
    if stream and u.first then
        var.herd_ttft = string.format("%.3f", math.max(0, u.first - started))
        if source == "reported" and output > 1 and u.last > u.first then
            var.herd_tpot = string.format("%.4f", (u.last - u.first) / (output - 1))
        end
    end
    return prompt + output
end

-- The tokens API key `key` spent in the current and the last minute, weighted by how much of the last minute
-- the sliding window still covers (the estimate of a 60 s window that two fixed windows give).
function _M.spent(key)
    local d = keys.gateway()
    local now = ngx.now()
    local minute = math.floor(now / 60)
    local current = d:get("u:" .. key .. ":" .. minute) or 0
    local previous = d:get("u:" .. key .. ":" .. (minute - 1)) or 0
    return current + previous * (1 - (now / 60 - minute))
end

-- Count `tokens` against API key `key` in the current minute (never evicts: a full dict leaves it uncounted).
function _M.add(key, tokens)
    if tokens and tokens > 0 then
        local minute = math.floor(ngx.now() / 60)
        local _, err = counters.incr("u:" .. key .. ":" .. minute, tokens, 120)
        if err then
            ngx.log(ngx.WARN, "herd gateway: herd_gateway: tokens of key ", key, " not counted: ", err)
        end
    end
end

return _M
