"""Run tools/herd_load.py and write the moment its clock starts, on CLOCK_MONOTONIC (one clock for the docker
host and its containers), so that a test can place the load's samples against its own fault timestamps.

Usage: python3 load_clock.py DIR_OF_HERD_LOAD T0_FILE HERD_LOAD_ARGS...
"""

import sys
import time

sys.path.insert(0, sys.argv[1])
import herd_load  # noqa: E402

_run = herd_load.Runner.run


async def _timed_run(self):
    # Runner.run sets its t0 from time.perf_counter() as its first statement.
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        fh.write(repr(time.perf_counter()))
    return await _run(self)


herd_load.Runner.run = _timed_run

if __name__ == "__main__":
    sys.exit(herd_load.main(sys.argv[3:]))
