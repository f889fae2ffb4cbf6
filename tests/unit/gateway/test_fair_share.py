"""Fair share between API keys in a full pool, weights and batch priority (issue 30), against the real nginx serving
the role's rendered gateway in front of a herd emulator instance (the lab stand-in for Ollama's inference) with 4
slots and 0.5 s answers (20 tokens at 40 tokens/s).

What each request went through comes from the gateway's own access log: its key, its queue wait (queue_wait), its
end (msec) and its length (request_time), so its admission is msec - request_time + queue_wait. The checks count
admissions and slots held, not seconds, so a loaded machine slows them without failing them.

- A quiet key (one request at a time) beside a noisy key (10 streaming clients on 4 slots): while a quiet request
  waits, at most 2 noisy requests are admitted (a plain FIFO admits every noisy request queued before it: 6).
- Weights: a key of weight 3 and one of weight 1, both saturating the pool, hold 3 and 1 of its 4 slots.
- Anticipation: a quiet key sending its requests back to back keeps its slot between them (the few milliseconds
  between an answer and the next request are not handed to the noisy key): at most its first request waits.
- Batch: a batch key beside a saturating interactive key is admitted only after gateway_batch_aging (1 s here)
  in the queue, and soon after it (aging + 2 s); alone, it takes the whole pool at once.
"""

import http.client
import json
import threading
import time

import pytest
from conftest import emulated_stack

TINY = "herd-tiny:1b"
SLOTS = 4
AGING = 1.0
KEYS = {name: f"{name}-key-0123456789abcdefghijklmnopqrstu" for name in ("noisy", "quiet", "heavy", "bulk")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, gw):
    tmp = tmp_path_factory.mktemp("fair-share")
    keys = gw.gateway_api_keys([
        {"name": "noisy", "key": KEYS["noisy"]},
        {"name": "quiet", "key": KEYS["quiet"]},
        {"name": "heavy", "key": KEYS["heavy"], "weight": 3},
        {"name": "bulk", "key": KEYS["bulk"], "priority": "batch"},
    ])
    with emulated_stack(tmp, gw, [TINY], parallel=SLOTS, tokens_per_second=40, _gateway_keys=keys,
                        gateway_queue_max=64, gateway_batch_aging=f"{AGING:g}s") as (gateway, _):
        yield gateway.port, tmp


def ask(port, key, label, tokens=20):
    """One streaming generate request of API key `key`, read to its end; the HTTP status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        body = json.dumps({"model": TINY, "prompt": f"{label} {time.monotonic_ns()}", "stream": True,
                           "options": {"num_predict": tokens}})
        conn.request("POST", "/api/generate", body, {"Authorization": f"Bearer {KEYS[key]}",
                                                     "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def clients(port, key, count, seconds, statuses):
    """`count` threads sending `key`'s requests back to back for `seconds` (at most 40 each); started threads."""
    stop = time.monotonic() + seconds

    def loop(n):
        for i in range(40):
            if time.monotonic() >= stop:
                return
            statuses.append(ask(port, key, f"{key}-{n}-{i}"))

    threads = [threading.Thread(target=loop, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    return threads


def records(tmp, mark):
    """The access log's generate records of requests that started after `mark` (from log_length):
    (key, start, admitted, end, queue_wait). nginx writes a record in its log phase, after the client has read the
    answer, so a request of the test before can still be logged after the mark: its start time leaves it out."""
    since_line, since = mark
    out = []
    for line in (tmp / "herd-gateway.access.log").read_text().splitlines()[since_line:]:
        rec = json.loads(line)
        if rec["uri"] != "/api/generate" or rec["status"] != "200" or rec["queue_wait"] == "":
            continue
        end, length, wait = float(rec["msec"]), float(rec["request_time"]), float(rec["queue_wait"])
        if end - length >= since - 0.005:
            out.append((rec["key"], end - length, end - length + wait, end, wait))
    return out


def log_length(tmp):
    """A mark for records(): the log's length and the time now."""
    path = tmp / "herd-gateway.access.log"
    return (len(path.read_text().splitlines()) if path.exists() else 0), time.time()


def join(threads, limit=90):
    deadline = time.monotonic() + limit
    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "clients still running"


def test_a_quiet_key_waits_for_one_free_slot_not_for_the_noisy_keys_queue(stack):
    port, tmp = stack
    start_line = log_length(tmp)
    statuses = []
    noise = clients(port, "noisy", 10, 7, statuses)
    time.sleep(1.5)  # the pool full, 6 noisy requests waiting
    quiet = []
    for i in range(6):
        quiet.append(ask(port, "quiet", f"quiet-{i}", tokens=4))
        time.sleep(0.2)
    join(noise)
    assert set(statuses) == {200} and quiet == [200] * 6, (statuses, quiet)
    recs = records(tmp, start_line)
    noisy = [r for r in recs if r[0] == "noisy"]
    overtaken = []
    for key, start, admitted, _, _ in recs:
        if key == "quiet":
            overtaken.append(sum(1 for r in noisy if start < r[2] < admitted))
    assert len(overtaken) == 6, recs
    # Without fair share every noisy request queued before a quiet one is admitted first (about 6 each time).
    assert max(overtaken) <= 2, overtaken
    noisy_waits = sorted(r[4] for r in noisy if r[1] > noisy[0][1] + 1.5)
    quiet_waits = sorted(r[4] for r in recs if r[0] == "quiet")
    assert quiet_waits[len(quiet_waits) // 2] < noisy_waits[len(noisy_waits) // 2] / 2, (quiet_waits, noisy_waits)


def test_a_key_sending_back_to_back_keeps_its_slot_between_requests(stack):
    port, tmp = stack
    start_line = log_length(tmp)
    statuses = []
    noise = clients(port, "noisy", 10, 6, statuses)
    time.sleep(1.5)
    quiet = [ask(port, "quiet", f"loop-{i}", tokens=8) for i in range(8)]
    join(noise)
    assert set(statuses) == {200} and quiet == [200] * 8, (statuses, quiet)
    waits = [r[4] for r in records(tmp, start_line) if r[0] == "quiet"]
    # The first finds every slot busy and waits for one; each next one arrives within the anticipation.
    assert len(waits) == 8 and sum(1 for w in waits if w >= 0.05) <= 1, waits


def held(recs, key, t):
    return sum(1 for r in recs if r[0] == key and r[2] <= t < r[3])


def test_weights_split_a_full_pool(stack):
    port, tmp = stack
    start_line = log_length(tmp)
    statuses = []
    threads = clients(port, "heavy", 8, 6, statuses) + clients(port, "noisy", 8, 6, statuses)
    join(threads)
    assert set(statuses) == {200}, statuses
    recs = records(tmp, start_line)
    first = min(r[1] for r in recs)
    # Sample the slots each key held in the steady middle of the run (both keys always had requests waiting).
    samples = [first + 1.5 + 0.05 * i for i in range(70)]
    heavy = sum(held(recs, "heavy", t) for t in samples) / len(samples)
    light = sum(held(recs, "noisy", t) for t in samples) / len(samples)
    assert heavy + light > SLOTS - 0.5, (heavy, light)
    assert 2.0 <= heavy / max(light, 0.01) <= 4.5, (heavy, light)


def test_batch_waits_behind_interactive_until_it_has_aged(stack):
    port, tmp = stack
    start_line = log_length(tmp)
    statuses = []
    noise = clients(port, "noisy", 10, 6, statuses)
    time.sleep(1.0)
    batch = clients(port, "bulk", 3, 3, statuses)
    join(noise + batch)
    assert set(statuses) == {200}, statuses
    recs = records(tmp, start_line)
    last_noisy = max(r[2] for r in recs if r[0] == "noisy")
    # Admitted while interactive requests still waited: each one only after its aging, and soon after it.
    during = [r for r in recs if r[0] == "bulk" and r[2] < last_noisy - 0.5]
    assert during, recs
    assert all(AGING - 0.05 <= r[4] <= AGING + 2.0 for r in during), [r[4] for r in during]

    # Alone, a batch key takes every slot at once.
    start_line = log_length(tmp)
    alone = clients(port, "bulk", SLOTS, 1, statuses)
    join(alone)
    recs = records(tmp, start_line)
    assert len(recs) >= SLOTS and {r[0] for r in recs} == {"bulk"}, recs
    assert max(r[4] for r in recs) < 0.5, recs
