"""A strict checker of the Prometheus text exposition format (version 0.0.4), standard library only.

Used by the exporter's unit tests and by the molecule verifier on the exporter's live /metrics answer.
`parse(text)` returns {family: {"type", "help", "samples": [(name, labels, value)]}} or raises FormatError.

It enforces what Prometheus' own parser requires plus the conventions a scrape must keep to be useful:
- `# HELP` / `# TYPE` lines are well formed, at most one of each per family, TYPE before the samples;
- metric and label names match the grammar; label values are quoted with only \\\\, \\" and \\n escapes;
- values are floats (NaN, +Inf, -Inf allowed); optional timestamps are integers;
- a family's samples are contiguous, no sample (name + label set) repeats, no label repeats in a sample;
- counters' samples end in `_total`; histograms have `_bucket` series with increasing `le` ending at +Inf,
  cumulative (non-decreasing) counts, and `_count` equal to the +Inf bucket, plus `_sum`;
- the text ends with a newline.
"""

from __future__ import annotations

import math
import re

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


class FormatError(ValueError):
    pass


def _float(text, where):
    if text in ("NaN", "+Inf", "-Inf", "Inf"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text):
        raise FormatError(f"{where}: bad value {text!r}")
    return float(text)


def _labels(text, pos, where):
    """Parse `{a="b",...}` starting at text[pos] == '{'; return (labels, position after '}')."""
    labels = {}
    pos += 1
    while True:
        if pos < len(text) and text[pos] == "}":
            return labels, pos + 1
        match = LABEL_NAME.match(text, pos)
        if not match:
            raise FormatError(f"{where}: bad label name at {text[pos : pos + 20]!r}")
        name = match.group(0)
        pos = match.end()
        if text[pos : pos + 2] != '="':
            raise FormatError(f'{where}: expected =" after label {name}')
        pos += 2
        value = []
        while True:
            if pos >= len(text):
                raise FormatError(f"{where}: unterminated value of label {name}")
            char = text[pos]
            if char == "\\":
                nxt = text[pos + 1 : pos + 2]
                if nxt not in ("\\", '"', "n"):
                    raise FormatError(f"{where}: bad escape \\{nxt} in label {name}")
                value.append("\n" if nxt == "n" else nxt)
                pos += 2
            elif char == '"':
                pos += 1
                break
            elif char == "\n":
                raise FormatError(f"{where}: raw newline in label {name}")
            else:
                value.append(char)
                pos += 1
        if name in labels:
            raise FormatError(f"{where}: label {name} repeated")
        labels[name] = "".join(value)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "}":
            continue
        else:
            raise FormatError(f"{where}: expected , or }} after label {name}")


def _family_of(name, families):
    """The declared family a sample name belongs to (histogram/summary suffixes stripped)."""
    if name in families:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            return name[: -len(suffix)]
    return name


def parse(text):
    if not text.endswith("\n"):
        raise FormatError("exposition must end with a newline")
    families = {}
    order = []
    seen_samples = set()
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        where = f"line {number}"
        if line == "":
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not METRIC_NAME.fullmatch(name):
                    raise FormatError(f"{where}: bad metric name {name!r}")
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                if parts[1] == "TYPE":
                    if len(parts) != 4 or parts[3] not in TYPES:
                        raise FormatError(f"{where}: bad TYPE line {line!r}")
                    if fam["type"] is not None:
                        raise FormatError(f"{where}: second TYPE for {name}")
                    if fam["samples"]:
                        raise FormatError(f"{where}: TYPE of {name} after its samples")
                    fam["type"] = parts[3]
                else:
                    if fam["help"] is not None:
                        raise FormatError(f"{where}: second HELP for {name}")
                    help_text = parts[3] if len(parts) == 4 else ""
                    if re.search(r"\\(?![\\n])", re.sub(r"\\[\\n]", "", help_text)):
                        raise FormatError(f"{where}: bad escape in HELP of {name}")
                    fam["help"] = help_text
                if name not in order:
                    order.append(name)
                elif order[-1] != name:
                    raise FormatError(f"{where}: metadata of {name} is not next to its family")
            continue
        match = METRIC_NAME.match(line)
        if not match:
            raise FormatError(f"{where}: bad sample line {line!r}")
        name = match.group(0)
        pos = match.end()
        labels = {}
        if pos < len(line) and line[pos] == "{":
            labels, pos = _labels(line, pos, where)
        rest = line[pos:]
        if not rest.startswith(" "):
            raise FormatError(f"{where}: expected a space before the value")
        fields = rest.strip().split(" ")
        if len(fields) not in (1, 2) or rest != " " + " ".join(fields):
            raise FormatError(f"{where}: bad value/timestamp part {rest!r}")
        value = _float(fields[0], where)
        if len(fields) == 2 and not re.fullmatch(r"-?\d+", fields[1]):
            raise FormatError(f"{where}: bad timestamp {fields[1]!r}")
        family = _family_of(name, families)
        fam = families.setdefault(family, {"type": None, "help": None, "samples": []})
        kind = fam["type"] or "untyped"
        if name != family and name[len(family) :] not in SUFFIXES.get(kind, ()):
            raise FormatError(f"{where}: sample {name} does not belong to {kind} {family}")
        if kind == "counter" and not name.endswith("_total"):
            raise FormatError(f"{where}: counter sample {name} must end in _total")
        if kind in ("counter",) and (value < 0 or math.isnan(value)):
            raise FormatError(f"{where}: counter {name} is {value}")
        if family not in order:
            order.append(family)
        elif order[-1] != family:
            raise FormatError(f"{where}: samples of {family} are not contiguous")
        key = (name, tuple(sorted(labels.items())))
        if key in seen_samples:
            raise FormatError(f"{where}: sample {name}{labels} repeated")
        seen_samples.add(key)
        fam["samples"].append((name, labels, value))
    for family, fam in families.items():
        if fam["type"] == "histogram":
            _check_histogram(family, fam["samples"])
    return families


def _check_histogram(family, samples):
    series = {}
    for name, labels, value in samples:
        base = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(base, {"buckets": [], "sum": None, "count": None})
        if name.endswith("_bucket"):
            if "le" not in labels:
                raise FormatError(f"{family}: bucket without le")
            entry["buckets"].append((_float(labels["le"], family), value))
        elif name.endswith("_sum"):
            entry["sum"] = value
        elif name.endswith("_count"):
            entry["count"] = value
        else:
            raise FormatError(f"{family}: stray sample {name}")
    for base, entry in series.items():
        buckets = entry["buckets"]
        if not buckets or buckets[-1][0] != math.inf:
            raise FormatError(f"{family}{dict(base)}: buckets must end with le=+Inf")
        bounds = [b for b, _ in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise FormatError(f"{family}{dict(base)}: le bounds must increase")
        counts = [c for _, c in buckets]
        if any(b < a for a, b in zip(counts, counts[1:], strict=False)):
            raise FormatError(f"{family}{dict(base)}: bucket counts must be cumulative")
        if entry["count"] is None or entry["sum"] is None:
            raise FormatError(f"{family}{dict(base)}: _count and _sum are required")
        if entry["count"] != counts[-1]:
            raise FormatError(f"{family}{dict(base)}: _count {entry['count']} != +Inf bucket {counts[-1]}")


def sample_value(families, name, **labels):
    """Sum of the samples named `name` whose labels include `labels`."""
    family = _family_of(name, families)
    return sum(
        value
        for sample, slabels, value in families.get(family, {}).get("samples", [])
        if sample == name and all(slabels.get(k) == v for k, v in labels.items())
    )
