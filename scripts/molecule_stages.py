#!/usr/bin/env python3
"""Print how long each stage of a molecule scenario took, from its time-stamped log (the Makefile's molecule-%
rule writes "HH:MM:SS " before every line). One line: `    stages: create 25 s, prepare 80 s, ...`."""

import re
import sys

STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d) .*➜ (\w+): (Executing|Executed)")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


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


def main(path):
    with open(path, encoding="utf-8", errors="replace") as fh:
        took = stages(fh)
    if took:
        print("    stages: " + ", ".join(f"{stage} {seconds} s" for stage, seconds in took))


if __name__ == "__main__":
    main(sys.argv[1])
