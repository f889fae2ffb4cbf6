"""JSON decoded the way Ollama decodes a request body: Go's encoding/json filling a struct (gin's ShouldBindJSON).

- A member name matches a field's JSON name exactly or else without regard to case, by Unicode simple folding
  (bytes.EqualFold): besides ASCII letters, U+017F (long s) folds to "s" and U+212A (Kelvin sign) to "k".
- When several members match one field, the last one wins; members matching no field are ignored.
- A map[string]any (Ollama's `options`) keeps member names exactly; the last duplicate wins.
- NaN and Infinity are not JSON.

Tests decode what the gateway forwards with it, so "what Ollama will run" is checked, not what the gateway thinks.
"""

import json

# The only non-ASCII characters whose simple case folding reaches an ASCII letter.
_FOLD = {"\u017f": "s", "\u212a": "k"}


def go_fold(name):
    return "".join(_FOLD.get(c, c.lower() if c.isascii() else c) for c in name)


class Obj(list):
    """A decoded JSON object: its (name, value) members in order, duplicates kept."""


def _reject(constant):
    raise ValueError(f"{constant} is not JSON")


def loads(text):
    return json.loads(text, object_pairs_hook=Obj, parse_constant=_reject)


def struct(value, fields):
    """The fields a Go struct with these JSON names gets from a decoded object (Obj): {field: value}."""
    if not isinstance(value, Obj):
        raise ValueError("not a JSON object")
    folded = {go_fold(f): f for f in fields}
    out = {}
    for name, member in value:
        field = name if name in fields else folded.get(go_fold(name))
        if field is not None:
            out[field] = member
    return out


def go_map(value):
    """A map[string]any from a decoded object: exact names, the last duplicate wins."""
    if value is None:
        return {}
    if not isinstance(value, Obj):
        raise ValueError("not a JSON object")
    return dict(value)
