#!/usr/bin/env python3
"""Print how long each stage of a molecule scenario took, from its time-stamped log (the Makefile's molecule-%
rule writes "HH:MM:SS " before every line). One line: `    stages: create 25 s, prepare 80 s, ...`; and, where
pytest printed its slowest durations (the rule sets PYTEST_ADDOPTS=--durations), a second line with the slowest
tests: `    slowest: test_a.py::test_x 312 s, ...`."""

import re
import sys

STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d) .*➜ (\w+): (Executing|Executed)")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
PREFIX = re.compile(r"^\d\d:\d\d:\d\d +(?:│ )?")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)s (call|setup|teardown) *(\S*)$")
SLOWEST = 6


def stages(lines):
    started, took = {}, []
    for line in lines:
        m = STAMP.match(COLOUR.sub("", line))
        if not m:
            continue
        seconds = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
        stage, what = m.group(4), m.group(5)
        if what == "Executing":
            started.setdefault(stage, seconds)
        elif stage in started:
            took.append((stage, (seconds - started.pop(stage)) % 86400))
    return took


def slowest(lines, count=SLOWEST):
    """The `count` longest test phases pytest reported: (seconds, test, phase), longest first. Molecule's console
    may fold a long line (the rest comes on the next lines, indented by two more spaces): the pieces are joined."""
    found, entry = [], None
    for line in lines:
        text = PREFIX.sub("", COLOUR.sub("", line.rstrip("\n")), count=1)
        m = DURATION.match(text.strip())
        if m:
            entry = [float(m.group(1)), m.group(3), m.group(2)]
            found.append(entry)
        elif entry is not None and text.startswith("  ") and text.strip() and " " not in text.strip():
            entry[1] += text.strip()
        else:
            entry = None
    out = []
    for seconds, test, phase in found:
        path, _, name = test.partition("::")
        out.append((seconds, path.rsplit("/", 1)[-1] + "::" + name.replace("ansible://", ""), phase))
    return sorted(out, reverse=True)[:count]


def main(path):
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.readlines()
    took = stages(lines)
    if took:
        print("    stages: " + ", ".join(f"{stage} {seconds} s" for stage, seconds in took))
    slow = slowest(lines)
    if slow:
        print("    slowest: " + ", ".join(
            f"{test}{'' if phase == 'call' else ' (' + phase + ')'} {seconds:.0f} s" for seconds, test, phase in slow))


if __name__ == "__main__":
    main(sys.argv[1])
