"""A burst of large bodies cannot exhaust the gateway host (issue 26 item 5, measured): N clients send bodies near
the inference limit at once; limit_conn and gateway_body_memory bound what the worker holds. The worker's RSS is
read before, during (sampled) and after the burst, and its peak (VmHWM) is checked against a bound derived from
the settings: every body held at once (at most gateway_body_memory, once in nginx's buffer and once rewritten)
plus the transient copies of the one body a worker parses at a time (measured 9x its size, test_hostile)."""

import json
import re
import threading
import time

from test_hostile import _start, send

CLIENTS = 24
BODY_MAX = 4  # MiB, gateway_body_max_inference
BODY_MEMORY = 16  # MiB, gateway_body_memory
LIMIT_CONN = 12


def _worker(gateway):
    children = open(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children").read().split()
    return children[0]


def _kib(pid, field):
    return int(re.search(field + r":\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))


def test_a_burst_of_large_bodies_stays_within_the_memory_bound(tmp_path, gw):
    a, b, gateway = _start(tmp_path, gw, delay=1.0, gateway_body_memory=f"{BODY_MEMORY}m",
                           gateway_body_max_inference=f"{BODY_MAX}m", gateway_limit_conn=LIMIT_CONN)
    try:
        send(gateway.port, "POST", "/api/generate", '{"model":"m1","prompt":"x"}')
        worker = _worker(gateway)
        rss_before, peak_before = _kib(worker, "VmRSS"), _kib(worker, "VmHWM")
        text = json.dumps({"model": "m1", "prompt": "x" * (BODY_MAX * 1024 * 1024 - 4096)})
        results, samples, done = [], [], threading.Event()

        def one():
            try:
                results.append(send(gateway.port, "POST", "/api/generate", text, timeout=60)[0])
            except OSError:
                results.append(0)

        def sample():
            while not done.is_set():
                samples.append(_kib(worker, "VmRSS"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        threads = [threading.Thread(target=one) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        elapsed = time.monotonic() - started
        done.set()
        sampler.join(5)
        time.sleep(0.5)
        rss_after, peak = _kib(worker, "VmRSS"), _kib(worker, "VmHWM")
        counts = {code: results.count(code) for code in sorted(set(results))}
        # Bound: bodies held at once twice over (nginx's buffer and the rewritten one) and one parse at 12x.
        bound = (2 * BODY_MEMORY + 12 * BODY_MAX) * 1024
        print(f"\n{CLIENTS} clients x {BODY_MAX} MiB at once (limit_conn {LIMIT_CONN}, body_memory {BODY_MEMORY} MiB): "
              f"answers {counts} in {elapsed:.1f} s; worker RSS before {rss_before // 1024} MiB, during max "
              f"{max(samples) // 1024} MiB ({len(samples)} samples), after {rss_after // 1024} MiB; peak (VmHWM) "
              f"+{(peak - peak_before) // 1024} MiB, bound +{bound // 1024} MiB")
        assert set(counts) <= {200, 429, 503}, counts
        assert counts.get(200, 0) >= 1 and counts.get(200, 0) + counts.get(503, 0) <= CLIENTS
        assert len(a.requests) == counts.get(200, 0) + 1
        assert peak - peak_before < bound, (peak, peak_before, bound)
        assert max(samples) - rss_before < bound
        # What the burst held is given back: the body budget is free, the next request is served.
        assert json.loads(send(gateway.port, "GET", "/herd/pools")[1])["body_held"] == 0
        assert send(gateway.port, "POST", "/api/generate", text, timeout=60)[0] == 200
    finally:
        gateway.stop()
        a.stop()
        b.stop()
