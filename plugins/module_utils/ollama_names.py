# Copyright: herd contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ollama model names, parsed and normalised the way Ollama does it (types/model/name.go). Standard library only.

One rule for all of herd: the planner (plugins/filter/ollama_plan.py), warmup/readiness and status comparisons
(the `ollama_model_name` filter), and the modules that read or write model stores (ollama_model_sync,
ollama_model_info) import these functions; nothing keeps its own copy.

    tiny                                   -> registry.ollama.ai/library/tiny:latest   (shortest: tiny:latest)
    library/tiny:1b                        -> registry.ollama.ai/library/tiny:1b       (shortest: tiny:1b)
    team/tiny                              -> registry.ollama.ai/team/tiny:latest      (shortest: team/tiny:latest)
    https://mirror.local:5000/team/tiny:q4 -> mirror.local:5000/team/tiny:q4           (shortest: the same)

With a site registry (role ollama's `ollama_registry`), `pull_name` says where a default-registry name is pulled
from: `tiny` with registry `mirror.local:5000` -> `mirror.local:5000/library/tiny:latest`; the store then keeps it
under its plain name (roles/ollama/tasks/models.yml copies it there with Ollama's /api/copy).

`/api/ps` and `/api/tags` name models by their shortest form (Ollama's Name.DisplayShortest), so comparing
`short_name(x)` on both sides is how a configured name meets what an instance reports.
"""

from __future__ import annotations

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
VALID_KINDS = ("skill", "agent", "mcp")
MISSING_PART = "!MISSING!"
# Longest name (UTF-8 bytes) looked at: the longest valid name (host 350, namespace, kind, model and tag 80 each,
# separators) plus room for a scheme and blanks. Longer is invalid before any parsing, so a hostile name costs
# nothing; the gateway's Lua port (roles/gateway/files/herd_gateway/names.lua) applies the same cap.
MAX_NAME_BYTES = 1024
# Blanks trimmed around a name: ASCII only (the gateway's port works on bytes).
BLANKS = " \t\n\r\f\v"


def _cut_promised(s, sep):
    """Split s at the last sep; a part promised by sep but empty becomes MISSING_PART (as Ollama does)."""
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return (s[:i] or MISSING_PART), (s[i + len(sep) :] or MISSING_PART), True


def valid_part(kind, s):
    """Whether s is a valid host, namespace, kind, model or tag part (Ollama's isValidPart)."""
    if kind == "kind":
        return s in VALID_KINDS
    limit = 350 if kind == "host" else 80
    if not 1 <= len(s) <= limit:
        return False
    for i, c in enumerate(s):
        alnum = c.isascii() and (c.isalnum() or c == "_")
        if i == 0:
            if not alnum:
                return False
        elif c in "_-":
            continue
        elif c == ".":
            if kind == "namespace":
                return False
        elif c == ":":
            if kind != "host":
                return False
        elif not alnum:
            return False
    return True


def _strip_scheme(host):
    scheme, sep, rest = host.partition("://")
    return rest if sep else scheme


def parse_name(s):
    """Parse a model name the way Ollama's types/model ParseName does and fill the defaults.

    Returns a dict with host, namespace, kind ('' for models), model and tag. Raises ValueError when the
    name is not valid once defaults are filled in.
    """
    if not isinstance(s, str):
        raise ValueError(f"model name must be a string, got {s!r}")
    if len(s.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ValueError(f"invalid model name {s[:40]!r}...: longer than {MAX_NAME_BYTES} bytes")
    rest = s.strip(BLANKS)
    n = {"host": "", "namespace": "", "kind": "", "model": "", "tag": ""}
    if rest.rfind(":") > rest.rfind("/"):
        rest, n["tag"], _ = _cut_promised(rest, ":")
    rest, n["model"], promised = _cut_promised(rest, "/")
    if not promised:
        n["model"] = rest
    else:
        rest, middle, promised = _cut_promised(rest, "/")
        if not promised:
            n["namespace"] = rest  # namespace/model
        elif middle not in VALID_KINDS:
            n["namespace"] = middle  # host/namespace/model
            n["host"] = _strip_scheme(rest)
        else:
            n["kind"] = middle  # [host/]namespace/kind/model
            rest, n["namespace"], promised = _cut_promised(rest, "/")
            if not promised:
                n["namespace"] = rest
            else:
                n["host"] = _strip_scheme(rest)
    n["host"] = n["host"] or DEFAULT_HOST
    n["namespace"] = n["namespace"] or DEFAULT_NAMESPACE
    n["tag"] = n["tag"] or DEFAULT_TAG
    for part in ("host", "namespace", "model", "tag"):
        if not valid_part(part, n[part]):
            raise ValueError(f"invalid model name {s!r}: bad {part} {n[part]!r}")
    if n["kind"] and not valid_part("kind", n["kind"]):
        raise ValueError(f"invalid model name {s!r}: bad kind {n['kind']!r}")
    return n


def name_parts(n):
    """Path parts of a parsed name below manifests/ (Ollama's Name.Filepath)."""
    if n["kind"]:
        return [n["host"], n["namespace"], n["kind"], n["model"], n["tag"]]
    return [n["host"], n["namespace"], n["model"], n["tag"]]


def full_name(n):
    """host/namespace/[kind/]model:tag of a parsed name."""
    middle = f"{n['kind']}/" if n["kind"] else ""
    return f"{n['host']}/{n['namespace']}/{middle}{n['model']}:{n['tag']}"


def shortest_name(n):
    """The name as /api/ps and /api/tags show it (Ollama's Name.DisplayShortest): default host and namespace left out."""
    middle = f"{n['kind']}/" if n["kind"] else ""
    if n["host"].lower() != DEFAULT_HOST:
        return f"{n['host']}/{n['namespace']}/{middle}{n['model']}:{n['tag']}"
    if n["namespace"].lower() != DEFAULT_NAMESPACE:
        return f"{n['namespace']}/{middle}{n['model']}:{n['tag']}"
    return f"{middle}{n['model']}:{n['tag']}"


def short_name(s):
    """Normalise a model name to the form Ollama reports (`tiny` -> `tiny:latest`); ValueError when invalid."""
    return shortest_name(parse_name(s))


def registry_error(registry):
    """'' when registry is a valid registry host[:port] (or empty: none); else what is wrong with it."""
    if registry == "":
        return ""
    if not isinstance(registry, str):
        return f"must be a string, got {registry!r}"
    if "://" in registry or "/" in registry:
        return f"must be a registry host[:port] only, without a scheme or a path (got {registry!r})"
    host, sep, port = registry.rpartition(":")
    if sep and not (port.isdigit() and 0 < int(port) < 65536):
        return f"has a bad port (got {registry!r})"
    if not valid_part("host", registry) or (sep and not host):
        return f"is not a valid registry host[:port] (got {registry!r})"
    return ""


def pull_name(s, registry=""):
    """The name to pull s by. With a site registry (host[:port]), a name of Ollama's default registry
    (registry.ollama.ai) is pulled from it: same namespace, model and tag, so `qwen2.5:7b` is pulled as
    `mirror.local:5000/library/qwen2.5:7b`. A name that names its own registry host is pulled as written."""
    n = parse_name(s)
    if registry and n["host"].lower() == DEFAULT_HOST:
        n = dict(n, host=registry)
    return full_name(n)


def same_model(a, b):
    """Whether two names mean the same model (Ollama compares the parts case-insensitively)."""
    return short_name(a).lower() == short_name(b).lower()


def name_from_parts(parts):
    """Full name from the path parts below manifests/, or None when they do not form a valid name."""
    if len(parts) == 4:
        n = {"host": parts[0], "namespace": parts[1], "kind": "", "model": parts[2], "tag": parts[3]}
    elif len(parts) == 5:
        n = {"host": parts[0], "namespace": parts[1], "kind": parts[2], "model": parts[3], "tag": parts[4]}
        if not valid_part("kind", n["kind"]):
            return None
    else:
        return None
    for part in ("host", "namespace", "model", "tag"):
        if not valid_part(part, n[part]):
            return None
    return full_name(n)
