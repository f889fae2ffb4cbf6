"""Delay scheduling of prefix routing (issue 31), against the real nginx serving the role's rendered gateway in front
of two herd emulator instances (lab stand-ins for Ollama's inference) with one slot each (max_conns 1), run with
gateway_prefix_max_wait 3s and with 0 (off). Two conversations, A cached on instance X and B on instance Y (8000
bytes of system prompt each, their own: a wait of up to 8000 / 2000 bytes/s, capped at 3 s, for the cache):

- X busy for a second, Y idle: A's next turn waits for X instead of taking Y; off, it takes Y at once.
- X busy for 3 s, a session pinned to Y sends a turn of A there (the pin goes first, not X's cache); A's next turn
  waits for X, and takes Y once Y holds A and is free (a waiting request plans again).
- X busy for 0.6 s and Y for 1.5 s, B's next turn queued first (the head of the queue), then A's: when X frees,
  A's turn takes it, passing the head, which waits for its own Y; off, the head takes X (first come, first served,
  away from its cache) and A's turn comes after it.
Which instance answered comes from X-Herd-Upstream (gateway_expose_upstream).
"""

import http.client
import json
import threading
import time

import pytest
from conftest import emulated_stack

TINY = "herd-tiny:1b"


def chat(port, messages, tokens=1, session=None):
    """One chat request (`session`: its X-Herd-Session); (instance, seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.monotonic()
    headers = {"Content-Type": "application/json", **({"X-Herd-Session": session} if session else {})}
    try:
        conn.request("POST", "/api/chat", json.dumps({"model": TINY, "messages": messages, "stream": False,
                                                      "options": {"num_predict": tokens}}), headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        return resp.getheader("X-Herd-Upstream"), time.monotonic() - t0
    finally:
        conn.close()


def background(port, messages, tokens, out, name, session=None):
    """chat() in a thread; its result lands in out[name]."""
    thread = threading.Thread(target=lambda: out.__setitem__(name, chat(port, messages, tokens, session)),
                              daemon=True)
    thread.start()
    return thread


def inflight(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/herd/pools")
        pools = json.loads(conn.getresponse().read())["pools"]
    finally:
        conn.close()
    return sum(i["inflight"] for p in pools for i in p["instances"])


def wait_inflight(port, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while inflight(port) < count:
        assert time.monotonic() < deadline, f"{count} requests never in flight"
        time.sleep(0.01)


def turn(history, text):
    return history + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": text}]


@pytest.fixture(scope="module", params=["3s", "0"], ids=["delay-scheduling", "off"])
def stack(request, tmp_path_factory, gw):
    tmp = tmp_path_factory.mktemp("delay-" + request.param)
    # the instances keep nothing past their one slot (Ollama 0.3.13-0.29's runner; llama-server's host-memory
    # cache would give back a prompt its slot gave up, and the cold turns here would not be cold)
    with emulated_stack(tmp, gw, [TINY], gpus=(0, 1), parallel=1, env={"HERD_EMU_RUNNER": "llamarunner"},
                        gateway_expose_upstream=True, gateway_queue_max=16, gateway_prefix_max_wait=request.param,
                        gateway_prefix_prefill_rate=2000, gateway_prefix_host_cache_bytes=0) as (gateway, _emus):
        yield gateway.port, request.param != "0"


def conversations(port, tag):
    """Conversations A (cached on X) and B (cached on Y), their own for each test: (a, b, x, y)."""
    a = [{"role": "system", "content": f"You are agent A{tag}. " * 440}, {"role": "user", "content": "task A"}]
    b = [{"role": "system", "content": f"You are agent B{tag}. " * 440}, {"role": "user", "content": "task B"}]
    x, _ = chat(port, a)
    out = {}
    holder = background(port, turn(a, "hold X"), 50, out, "hold")  # cached on X, X idle: goes to X
    wait_inflight(port, 1)
    y, _ = chat(port, b)  # nothing of B cached, X busy: the least loaded, Y
    holder.join(10)
    assert out["hold"][0] == x and y != x, (x, y, out)
    return a, b, x, y


def test_a_cached_turn_waits_for_its_instance(stack):
    port, on = stack
    a, _b, x, y = conversations(port, 1)
    out = {}
    holder = background(port, turn(a, "hold X again"), 100, out, "hold")  # X busy for about 1 s
    wait_inflight(port, 1)
    served, took = chat(port, turn(a, "next"))
    holder.join(10)
    assert out["hold"][0] == x
    if on:
        assert served == x and took >= 0.5, (served, took)  # waited for X's slot rather than go cold on Y
    else:
        assert served == y, (served, took)  # took the idle instance at once (and evaluated the prompt there)


def test_a_cached_turn_passes_the_head_of_the_queue(stack):
    port, on = stack
    a, b, x, y = conversations(port, 2)
    out = {}
    threads = [background(port, turn(a, "hold X briefly"), 60, out, "hold_x")]  # about 0.6 s on X
    wait_inflight(port, 1)
    threads.append(background(port, turn(b, "hold Y"), 150, out, "hold_y"))  # about 1.5 s on Y
    wait_inflight(port, 2)
    threads.append(background(port, turn(b, "B next"), 1, out, "b"))  # the head of the queue
    time.sleep(0.1)
    threads.append(background(port, turn(a, "A next"), 1, out, "a"))  # behind it
    for thread in threads:
        thread.join(30)
    assert out["hold_x"][0] == x and out["hold_y"][0] == y, out
    if on:
        # X freed first: A's turn took it (its cache), passing B's, which waited for Y (its cache)
        assert out["a"][0] == x and out["b"][0] == y, out
        assert out["a"][1] + 0.1 < out["b"][1], out
    else:
        # first come, first served: B's turn took X when it freed (away from its cache on Y), A's came after it
        assert out["b"][0] == x and out["b"][1] + 0.1 < out["a"][1], out


def test_a_waiting_turn_goes_where_its_prompt_is_now(stack):
    """A's next turn waits for X (the only instance that held A when it came, busy for 3 s) while Y serves a
    session pinned there whose turn carries A's prompt: when that ends, Y holds A and is free, and the waiting turn
    takes Y at once (it plans again while it waits) rather than wait on for X. Off: it takes the first slot that
    frees anywhere, Y's, as well."""
    port, _on = stack
    a, _b, x, y = conversations(port, 3)
    out = {}
    threads = [background(port, turn(a, "hold X long"), 300, out, "hold")]  # about 3 s on X
    wait_inflight(port, 1)
    assert chat(port, [{"role": "user", "content": "pin s3"}], 1, "s3")[0] == y  # session s3 starts on Y
    threads.append(background(port, turn(a, "A on Y"), 50, out, "pinned", "s3"))  # about 0.5 s on Y
    wait_inflight(port, 2)
    served, took = chat(port, turn(a, "A next"))
    for thread in threads:
        thread.join(30)
    # the pinned turn went to its session's Y at once, although X holds more of its prompt
    assert out["hold"][0] == x and out["pinned"][0] == y and out["pinned"][1] < 2.0, out
    assert served == y and took < 2.0, (served, took, out)


def prefix_waits(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/herd/pools")
        pools = json.loads(conn.getresponse().read())["pools"]
    finally:
        conn.close()
    return sum(p.get("prefix_waits") or 0 for p in pools)


def test_a_new_session_waits_for_the_first_ones_prefill(stack):
    """New sessions of one agent while its first session's answer is still coming (its prefix pending on X, cached
    nowhere yet): the first of them waits for that answer to end and goes where the prefix now is, X; the next one
    does not wait (one waiter per pending request: the slot that frees holds the prefix once) and takes idle Y.
    Off: the first of them takes Y at once."""
    port, on = stack
    system = {"role": "system", "content": "You are agent N. " * 500}
    out = {}
    before = prefix_waits(port)
    threads = [background(port, [system, {"role": "user", "content": "session 1"}], 80, out, "first")]
    wait_inflight(port, 1)
    threads.append(background(port, [system, {"role": "user", "content": "session 2"}], 1, out, "second"))
    time.sleep(0.2)
    threads.append(background(port, [system, {"role": "user", "content": "session 3"}], 1, out, "third"))
    for thread in threads:
        thread.join(30)
    x = out["first"][0]
    if on:
        assert out["second"][0] == x and out["third"][0] != x, out
        assert out["third"][1] + 0.2 < out["second"][1], out  # the third did not wait for the first
        assert prefix_waits(port) == before + 1
    else:
        assert out["second"][0] != x, out
        assert prefix_waits(port) == before == 0
