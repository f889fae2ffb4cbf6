"""Model names to test the gateway's Lua port of Ollama's name rule against its source, the Python module
plugins/module_utils/ollama_names.py (through the gateway filter gateway_model_key).

`name_cases()` generates the inputs: schemes, hosts with ports, namespaces, kinds, digests, case, blanks, every
invalid character class and both sides of every length limit Ollama's name parser has (host 350, namespace,
model and tag 80, the whole name MAX_NAME_BYTES). `fuzz_names()` adds seeded random names over the characters
that matter. The expected answer of every case is the Python rule's, computed at test time: nothing here states
what a name means.
"""

import random

HOST_MAX, PART_MAX, NAME_MAX = 350, 80, 1024


def _limits():
    """Both sides of every part's length limit, in each position of a full name."""
    out = []
    for n in (PART_MAX - 1, PART_MAX, PART_MAX + 1):
        part = "m" * n
        out += [part, f"{part}:t", f"ns/{part}", f"h.io/ns/{part}:t",  # model
                f"x:{'t' * n}", f"ns/x:{'t' * n}",  # tag
                f"{'n' * n}/x", f"h.io/{'n' * n}/x:t"]  # namespace
    for n in (HOST_MAX - 1, HOST_MAX, HOST_MAX + 1):
        out += [f"{'h' * n}/ns/x:t", f"https://{'h' * n}/ns/x:t", f"{'h' * (n - 5)}:5000/ns/x"]
    # The whole name: at, just under and just over the cap (a scheme and blanks carry the length).
    for total in (NAME_MAX - 1, NAME_MAX, NAME_MAX + 1):
        tail = "://h/ns/x:t"
        out.append("s" * (total - len(tail)) + tail)
        out.append(" " * (total - 1) + "x")
    return out


def name_cases():
    """Deterministic name inputs (strings, and a few non-strings the gateway may meet in a JSON body)."""
    cases = [
        # the defaults and the short form
        "llama3", "llama3:latest", "qwen2.5:7b", "library/qwen2.5:7b", "registry.ollama.ai/library/qwen2.5:7b",
        "registry.ollama.ai/library/llama3", "registry.ollama.ai/jmorgan/mistral:7b", "jmorgan/mistral",
        # case: Ollama compares without regard to it
        "Llama3:8B", "LLAMA3", "Registry.Ollama.AI/Library/X:Latest", "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
        # hosts, ports, schemes
        "localhost:5000/team/model:v1", "localhost:5000/team/model", "https://host:5000/team/tiny:q4",
        "http://mirror.local/library/tiny", "https://mirror.local/x", "mirror.local:5000/x:t", "a.b.c:1/n/m",
        "https:///team/tiny", "://h/n/m", "HTTPS://H/N/M:T", "ftp://h:1/n/m:t", "https://h/n/m:t:u",
        "h1/h2/ns/model:t", "a/b/c/d/e",
        # kinds (host/namespace/kind/model)
        "team/skill/x", "h.io/team/agent/x:1", "team/mcp/x", "team/SKILL/x", "team/other/x", "skill/x",
        # digests: not part of a name Ollama accepts
        "herd-tiny:1b@sha256:0123abcd", "x@sha256:00", "@sha256:00", "x@",
        # blanks
        "  herd-tiny:1b  ", "\tx\n", "x y", " ", "\u00a0x", "x\u2003",
        # empty and missing parts
        "", ":", "x:", ":t", "/x", "x/", "library/", "/", "//", "a//b", "ns/:t", "h//x",
        # invalid characters, first and later positions
        "tiny!", "a b", "-x", ".x", "x.", "_x", "x_", "x-", "ns.a/x", "ns/x.y", "ns/x:t.1", "x:-t", "x:t:u",
        "h_ost/n/m", "-h/n/m", ".h/n/m", "h:/n/m", "h/n:/m", "é", "xé", "x:é", "ns/é", "x\u0000", "x\x7f",
        "x%41", "x/../y", "x\\y", "x?y", "x#y", "x\"y", "x'y", "x*", "x[0]", "x{}",
        # pathological shapes the old Lua trimmed in quadratic time
        "a" + " " * 5000 + "b", " " * 3000, "a" + "\t" * 2000, ":" * 2000, "/" * 2000, "@" * 2000,
    ]
    cases += _limits()
    return cases


FUZZ_ALPHABET = "aZ9_-.:/@ \t" + "é!%"


def fuzz_names(count=1500, seed=26):
    """Seeded random names over the characters that steer the parser (separators, blanks, a few invalid ones)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.choice((1, 2, 3, 5, 8, 13, 21, 40))
        out.append("".join(rng.choice(FUZZ_ALPHABET) for _ in range(n)))
    return out
