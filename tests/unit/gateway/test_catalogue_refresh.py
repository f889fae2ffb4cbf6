"""The catalogue costs one fan-out per cache lifetime, however many requests arrive (issue 32), against the real
nginx serving the role's rendered gateway in front of three herd emulator instances (the lab stand-in
for Ollama's inference) that log every request.

- A burst of concurrent /api/tags requests with nothing cached: every instance is asked once, every request gets
  the same answer.
- The same burst once the answer is no longer fresh: one refresh (every instance asked once more), the others
  served the answer before meanwhile.
"""

import json
import re
import threading
import time
import urllib.request

from conftest import emulated_stack

TINY = "herd-tiny:1b"


def burst(port, n=24):
    """n concurrent GET /api/tags; their (status, body) pairs."""
    out, lock = [], threading.Lock()

    def one():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tags", timeout=30) as resp:
            body = resp.read()
            with lock:
                out.append((resp.status, body))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def asked(emus):
    return [len(re.findall(r'GET\s+"/api/tags"', emu.log())) for emu in emus]


def test_one_fan_out_per_lifetime_under_a_burst(tmp_path, gw):
    with emulated_stack(tmp_path, gw, [TINY], gpus=(0, 1, 2), env={"HERD_EMU_ACCESS_LOG": "1"}) as (gateway, emus):
        first = burst(gateway.port)
        time.sleep(0.3)  # the instances' log lines
        assert len(first) == 24 and {s for s, _ in first} == {200} and len({b for _, b in first}) == 1, first[:2]
        assert TINY in json.loads(first[0][1])["models"][0]["name"]
        assert asked(emus) == [1, 1, 1]
        cached = burst(gateway.port)
        time.sleep(0.3)
        assert asked(emus) == [1, 1, 1] and {b for _, b in cached} == {first[0][1]}
        time.sleep(2.2)  # no longer fresh
        again = burst(gateway.port)
        time.sleep(0.3)
        assert {s for s, _ in again} == {200} and asked(emus) == [2, 2, 2], asked(emus)
