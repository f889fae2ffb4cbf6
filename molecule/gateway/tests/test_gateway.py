"""Real HTTP behaviour through the gateway on h4-gw (nginx + Lua from roles nginx + gateway, lab Ollama emulators).

Pools (molecule.yml): herd-tiny:1b = h4-gw:0 (1 slot) + h4-gpu1:0 (2 slots); herd-small:7b = h4-gpu1:1 (1 slot)
+ h4-gpu1:2 (2 slots); herd-embed:v1 = h4-gpu1:3 (2 slots, an embedding-only model: test_dialects.py).
gateway_queue_per_instance 0, so max_conns = num_parallel and 3 slots per pool.
"""

import hashlib
import json
import os
import statistics
import sys
import time

from conftest import GW, KEY, SCENARIO, access_log, call, dump_journal, playbook, pools, stream

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_measure import measured as _measured  # noqa: E402

TINY, SMALL, EMBED = "herd-tiny:1b", "herd-small:7b", "herd-embed:v1"


def upstreams_of(gw):
    """Every instance's address as nginx reports it in X-Herd-Upstream -> its key."""
    ip = gw.check_output("getent ahostsv4 h4-gpu1 | awk 'NR==1{print $1}'")
    return {f"{ip}:11434": "h4-gpu1:0", f"{ip}:11435": "h4-gpu1:1", f"{ip}:11436": "h4-gpu1:2",
            f"{ip}:11437": "h4-gpu1:3", "127.0.0.1:11434": "h4-gw:0"}


POOL_OF = {"h4-gw:0": TINY, "h4-gpu1:0": TINY, "h4-gpu1:1": SMALL, "h4-gpu1:2": SMALL, "h4-gpu1:3": EMBED}


def wait_files(gw, pattern, count, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.run(f"ls {pattern} 2>/dev/null | wc -l").stdout.strip() == str(count):
            return True
        time.sleep(0.5)
    return False


def wait_idle(gw, timeout=30):
    """Until no request is in flight or queued at the gateway (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = pools(gw)
        if all(p["queued"] == 0 and all(i["inflight"] == 0 for i in p["instances"]) for p in state.values()):
            return state
        time.sleep(0.3)
    raise AssertionError(f"gateway not idle after {timeout}s: {pools(gw)}")


def start_streams(gw, prefix, count, tokens, model=TINY):
    gw.check_output(f"rm -f /tmp/{prefix}*.json*; for i in $(seq 1 {count}); do "
                    f"nohup h4-client stream {GW}/api/generate --key {KEY} --model {model} --tokens {tokens} "
                    f"--out /tmp/{prefix}$i.json >/dev/null 2>&1 & done")


def read_results(gw, prefix, count):
    return [json.loads(gw.file(f"/tmp/{prefix}{i}.json").content_string) for i in range(1, count + 1)]


def test_nginx_runs_with_lua_and_config_is_valid(gw):
    assert gw.service("nginx").is_running, dump_journal(gw)
    assert gw.run("nginx -t -q").rc == 0
    full = gw.check_output("nginx -T 2>/dev/null")
    assert "ngx_http_lua_module.so" in full and "balancer_by_lua_block" in full
    conf = gw.file("/etc/nginx/conf.d/herd-gateway.conf")
    assert conf.mode == 0o644 and conf.user == "root"
    keys = gw.file("/etc/nginx/herd/gateway-keys.json")
    assert keys.mode == 0o600
    # Names, digests and limits, never a key; the fair-share fields as the inventory set them.
    record = {entry[1]: entry[2] for entry in json.loads(keys.content_string)["keys"]}
    assert "h4-lab-key" not in keys.content_string
    assert record["team-a"]["weight"] == 2 and record["team-a"]["priority"] == "interactive", record
    assert record["team-b"] == {"max_requests": 1, "tokens_per_minute": 0, "models": ["herd-tiny:1b"], "weight": 1,
                                "priority": "batch"}, record
    # The entry module and every module of the role, byte for byte (teardown removes the directory).
    role_files = os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "roles", "gateway", "files")
    modules = ["herd_gateway.lua"] + sorted(f"herd_gateway/{name}" for name in
                                            os.listdir(os.path.join(role_files, "herd_gateway")))
    assert len(modules) > 10 and gw.file("/usr/local/share/herd/lua/herd_gateway").mode == 0o755
    for name in modules:
        deployed = gw.file(f"/usr/local/share/herd/lua/{name}")
        with open(os.path.join(role_files, name), "rb") as handle:
            expected = hashlib.sha256(handle.read()).hexdigest()
        assert deployed.mode == 0o644 and deployed.sha256sum == expected, name
    assert gw.file("/usr/local/sbin/herd-gateway-drain").mode == 0o755
    assert gw.socket("tcp://0.0.0.0:80").is_listening and gw.socket("tcp://0.0.0.0:443").is_listening
    assert "[error]" not in gw.run("tail -n 50 /var/log/nginx/error.log").stdout


def test_health_answers_without_backend(gw):
    reply = call(gw, "GET", GW + "/herd/health")
    assert reply["status"] == 200 and json.loads(reply["body"]) == {"status": "ok"}
    assert reply["headers"].get("x-herd-upstream", "") == ""


def test_pool_status_lists_pools_and_instances(gw):
    state = pools(gw)
    assert set(state) == {TINY, SMALL, EMBED}
    assert {i["key"]: i["max_conns"] for i in state[TINY]["instances"]} == {"h4-gw:0": 1, "h4-gpu1:0": 2}
    assert {i["key"]: i["max_conns"] for i in state[SMALL]["instances"]} == {"h4-gpu1:1": 1, "h4-gpu1:2": 2}
    assert state[TINY]["queue_max"] == 32 and "+Inf" in state[TINY]["wait_seconds"]["buckets"]
    # Loopback only, like stub_status.
    assert gw.run("curl -s -o /dev/null -w '%{http_code}' http://$(hostname -i | awk '{print $1}')/herd/pools"
                  ).stdout in ("403",)


def test_one_catalogue_same_answer_every_time(gw):
    answers = [call(gw, "GET", GW + "/api/tags", key=KEY) for _ in range(20)]
    assert all(a["status"] == 200 for a in answers), answers[0]
    assert len({a["body"] for a in answers}) == 1, sorted({a["body"] for a in answers})
    names = [m["name"] for m in json.loads(answers[0]["body"])["models"]]
    assert sorted(names) == [EMBED, SMALL, TINY], names
    models = json.loads(call(gw, "GET", GW + "/v1/models", key=KEY)["body"])
    assert models["object"] == "list" and sorted(m["id"] for m in models["data"]) == [EMBED, SMALL, TINY]
    ps = json.loads(call(gw, "GET", GW + "/api/ps", key=KEY)["body"])["models"]
    assert {(m["herd_instance"], m["name"]) for m in ps} == {(k, POOL_OF[k]) for k in POOL_OF}
    assert call(gw, "GET", GW + "/api/tags")["status"] == 401


def test_answers_from_the_gateway_itself(gw):
    before = len(access_log(gw))
    reply = call(gw, "POST", GW + "/api/generate", key=KEY, body={"model": "llama9:70b", "prompt": "x"})
    assert reply["status"] == 404, reply
    assert json.loads(reply["body"]) == {"error": 'model "llama9:70b" not found, try pulling it first'}
    reply = call(gw, "POST", GW + "/api/chat", key=KEY, body={"messages": []})
    assert reply["status"] == 400 and "model" in json.loads(reply["body"])["error"]
    out = gw.check_output(f"curl -s -w ' %{{http_code}}' -H 'Authorization: Bearer {KEY}' -d 'not json' "
                          f"{GW}/v1/chat/completions")
    assert out.endswith(" 400") and "error" in json.loads(out[:-4])
    entries = access_log(gw)[before:]
    assert [e["status"] for e in entries] == ["404", "400", "400"]
    assert all(e["upstream"] == "" for e in entries), entries


def test_200_mixed_requests_each_reach_an_instance_of_its_model(gw):
    addresses = upstreams_of(gw)
    spec = []
    for i in range(200):
        model = (TINY, SMALL, "library/herd-tiny:1b", "registry.ollama.ai/library/herd-small:7b")[i % 4]
        kind = i % 3
        if kind == 0:
            spec.append({"i": i, "path": "/api/generate",
                         "body": {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 2}}})
        elif kind == 1:
            spec.append({"i": i, "path": "/api/chat", "body": {"model": model, "stream": False,
                         "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 2}}})
        else:
            spec.append({"i": i, "path": "/v1/chat/completions", "body": {"model": model, "max_tokens": 2,
                         "messages": [{"role": "user", "content": "hi"}]}})
    gw.check_output(f"cat > /tmp/mixed.json <<'EOF'\n{json.dumps(spec)}\nEOF")
    before = len(access_log(gw))
    start = time.monotonic()
    results = json.loads(gw.check_output(f"h4-client batch {GW} /tmp/mixed.json --key {KEY} --concurrency 12"))
    took = time.monotonic() - start
    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200][:3]
    wanted = {i: (TINY if i % 2 == 0 else SMALL) for i in range(200)}
    for r in results:
        assert POOL_OF[addresses[r["upstream"]]] == wanted[r["i"]], r
    entries = [e for e in access_log(gw)[before:] if e["uri"] in ("/api/generate", "/api/chat", "/v1/chat/completions")]
    assert len(entries) == 200
    for e in entries:
        assert POOL_OF[addresses[e["upstream"]]] == e["pool"], e
    assert {addresses[e["upstream"]] for e in entries} == {k for k, pool in POOL_OF.items() if pool != EMBED}
    _measured(f"200 mixed requests (2 models, 3 endpoints, 12 at once) in {took:.1f} s, every one on its pool")
    wait_idle(gw)


def test_client_keep_alive_zero_leaves_models_loaded(gw):
    for model in (TINY, SMALL):
        # In any case: Ollama reads member names without regard to case.
        for member in ("keep_alive", "Keep_Alive", "KEEP_ALIVE"):
            reply = call(gw, "POST", GW + "/api/generate", key=KEY, body={"model": model, member: 0})
            assert reply["status"] == 200, reply
            assert json.loads(reply["body"]).get("done_reason") != "unload", reply
    ip = upstreams_of(gw)
    for address, key in ip.items():
        ps = json.loads(gw.check_output(f"curl -sf http://{address}/api/ps"))["models"]
        assert [m["name"] for m in ps] == [POOL_OF[key]], (key, ps)


def test_allowlist_and_keys(gw, client):
    assert call(gw, "GET", GW + "/api/version", key=KEY)["status"] == 200
    missing = call(gw, "GET", GW + "/api/version")
    assert missing["status"] == 401 and "error" in json.loads(missing["body"])
    assert missing["headers"]["www-authenticate"].startswith("Bearer")
    assert call(gw, "GET", GW + "/api/version", key="h4-wrong-key-000000000000")["status"] == 401
    # h4-client is outside gateway_allow: 403 even with the right key.
    for key in (KEY, None):
        denied = call(client, "GET", "http://h4-gw/api/tags", key=key)
        assert denied["status"] == 403 and "not allowed" in json.loads(denied["body"])["error"]


def test_tls_with_generated_certificate(gw):
    reply = call(gw, "GET", "https://127.0.0.1/api/version", key=KEY)
    assert reply["status"] == 200 and "version" in json.loads(reply["body"])
    assert gw.file("/etc/nginx/herd/tls/gateway.key").mode == 0o600


def test_model_management_is_refused(gw):
    reply = call(gw, "POST", GW + "/api/pull", key=KEY, body={"model": "herd-tiny:1b"})
    assert reply["status"] == 403 and "herd" in json.loads(reply["body"])["error"]


def test_stream_chunks_arrive_before_the_end_and_ttft_matches_direct(gw):
    result = stream(gw, tokens=40)
    assert result["status"] == 200 and result["done"] and result["chunks"] >= 40, result
    # 40 tokens at 20 tokens/s: about 2 s; the first chunk must come long before the end.
    assert result["chunk_times"][0] < 0.5 and result["t_end"] > 1.5, result
    assert result["chunk_times"][len(result["chunk_times"]) // 2] < result["t_end"] - 0.5, result
    # Sequential pairs, timed inside one client process: through the gateway, then straight to the instance
    # that served it (which instance varies: equally loaded instances take turns).
    pairs = json.loads(gw.check_output(f"h4-client ttft {GW}/api/generate --key {KEY} --count 40"))
    assert "error" not in pairs, pairs
    gateway, direct = pairs["gateway"], pairs["direct"]

    def p(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] * 1000

    _measured(f"TTFT through the gateway p50 {p(gateway, 0.5):.1f} ms p99 {p(gateway, 0.99):.1f} ms, direct p50 "
              f"{p(direct, 0.5):.1f} ms p99 {p(direct, 0.99):.1f} ms (40 pairs, same instance each, lab containers)")
    assert statistics.median(gateway) - statistics.median(direct) < 0.05, (gateway, direct)


def test_one_megabyte_prompt_is_routed_from_memory(gw):
    gw.check_output("python3 -c \"import json; print(json.dumps({'model': 'herd-small:7b', 'prompt': 'x' * 1048576, "
                    "'stream': False, 'options': {'num_predict': 1}}))\" > /tmp/big.json")
    times = {}
    for name, url in (("gateway", GW), ("direct", None)):
        if url is None:
            url = "http://" + [a for a, k in upstreams_of(gw).items() if k == "h4-gpu1:2"][0]
        # "Expect:" off: curl would otherwise wait 1 s for a 100-continue the emulator never sends.
        out = gw.check_output(f"curl -s -o /dev/null -w '%{{http_code}} %{{time_total}}' -H 'Expect:' "
                              f"-H 'Authorization: Bearer {KEY}' "
                              f"--data-binary @/tmp/big.json {url}/api/generate")
        status, took = out.split()
        assert status == "200", out
        times[name] = float(took)
    # The body stays in memory: the buffer of the model endpoints is as large as the largest inference body the
    # gateway accepts (gateway_body_max_inference, 16m by default).
    assert "client_body_buffer_size 16m;" in gw.check_output("nginx -T 2>/dev/null")
    assert times["gateway"] - times["direct"] < 0.1, times
    _measured(f"1 MiB prompt: {times['gateway'] * 1000:.0f} ms through the gateway, {times['direct'] * 1000:.0f} ms "
              "direct (no temp file)")


def test_three_times_the_slots_all_served_in_turn(gw):
    wait_idle(gw)
    before = pools(gw)[TINY]
    start_streams(gw, "q3x", 9, 20)  # 3 slots in the pool; 20 tokens at 20/s = 1 s each
    assert wait_files(gw, "/tmp/q3x?.json", 9, timeout=60)
    results = read_results(gw, "q3x", 9)
    assert all(r["status"] == 200 and r["done"] and r["chunks"] >= 20 for r in results), results
    after = wait_idle(gw)[TINY]
    assert after["admitted"] - before["admitted"] == 9
    assert after["rejected_full"] == before["rejected_full"] and after["rejected_timeout"] == before["rejected_timeout"]
    waited = after["wait_seconds"]["buckets"]["+Inf"] - after["wait_seconds"]["buckets"]["0.1"]
    waited_before = before["wait_seconds"]["buckets"]["+Inf"] - before["wait_seconds"]["buckets"]["0.1"]
    assert waited - waited_before >= 3, after  # 6 of the 9 had to wait for a slot
    firsts = sorted(r["chunk_times"][0] for r in results)
    _measured(f"3x slots (9 streams, 3 slots): all 200; first tokens at {', '.join(f'{t:.1f}' for t in firsts)} s")


def test_client_that_hangs_up_while_queued_holds_no_slot(gw):
    wait_idle(gw)
    before = pools(gw)[TINY]
    start_streams(gw, "hold", 3, 40)  # the pool's 3 slots for 2 s
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and sum(i["inflight"] for i in pools(gw)[TINY]["instances"]) < 3:
        time.sleep(0.05)
    gw.check_output(f"h4-client stream {GW}/api/generate --key {KEY} --tokens 5 --hangup 0.5")
    mid = pools(gw)[TINY]
    assert mid["abandoned"] - before["abandoned"] == 1 and mid["queued"] == 0, mid
    nxt = stream(gw, tokens=5)
    assert nxt["status"] == 200 and nxt["done"], nxt
    assert wait_files(gw, "/tmp/hold?.json", 3)
    after = wait_idle(gw)[TINY]
    assert after["admitted"] - before["admitted"] == 4, after


def test_drain_one_instance_of_a_pool_keeps_the_pool_served(gw):
    addresses = upstreams_of(gw)
    start_streams(gw, "drain", 1, 60, model=SMALL)
    assert wait_files(gw, "/tmp/drain1.json.upstream", 1, timeout=10)
    address = gw.file("/tmp/drain1.json.upstream").content_string.strip()
    target = addresses[address]
    try:
        rc, out = playbook("playbooks/drain.yml", "-e", f"drain={target}")
        assert rc == 0, out
        # The playbook returned only once the in-flight stream had ended (its result file is written at the end).
        assert gw.file("/tmp/drain1.json").exists, "drain returned while the stream was still running"
        assert "no request in flight" in out
        result = json.loads(gw.file("/tmp/drain1.json").content_string)
        assert result["status"] == 200 and result["done"] and result["chunks"] >= 60, result
        assert json.loads(gw.file("/var/lib/herd/gateway/drained.json").content_string) == [target]
        seen = set()
        for i in range(6):  # distinct prompts: one prompt would stay on one instance (conversation affinity)
            reply = call(gw, "POST", GW + "/api/generate", key=KEY,
                         body={"model": SMALL, "prompt": f"x{i}", "stream": False, "options": {"num_predict": 1}})
            assert reply["status"] == 200, reply
            seen.add(addresses[reply["headers"]["x-herd-upstream"]])
        assert seen == {k for k in POOL_OF if POOL_OF[k] == SMALL and k != target}, seen
        state = {i["key"]: i["down"] for i in pools(gw)[SMALL]["instances"]}
        assert state[target] is True
        # The command itself: unknown target -> non-zero naming it, nothing changed.
        bad = gw.run("herd-gateway-drain drain h4-nope:9")
        assert bad.rc != 0 and "h4-nope:9" in bad.stderr
        assert json.loads(gw.file("/var/lib/herd/gateway/drained.json").content_string) == [target]
    finally:
        rc, out = playbook("playbooks/drain.yml", "-e", f"undrain={target}")
    assert rc == 0, out
    seen = set()
    for i in range(12):
        reply = call(gw, "POST", GW + "/api/generate", key=KEY,
                     body={"model": SMALL, "prompt": f"y{i}", "stream": False, "options": {"num_predict": 1}})
        seen.add(addresses[reply["headers"]["x-herd-upstream"]])
        if target in seen:
            break
    assert target in seen
    assert json.loads(gw.file("/var/lib/herd/gateway/drained.json").content_string) == []


def test_small_queue_max_answers_503_at_once_for_the_excess(gw):
    wait_idle(gw)
    rc, out = playbook(os.path.join(SCENARIO, "converge.yml"), "-e", json.dumps({"gateway_queue_max": 1}))
    assert rc == 0, out[-3000:]
    try:
        start_streams(gw, "qmax", 4, 40)  # 3 slots + 1 waiting place
        time.sleep(1.0)
        # Retry-After: the pool's measured wait (/herd/pools retry_after, 1-60 s), no longer gateway_retry_after (3).
        measured_wait = pools(gw)[TINY]["retry_after"]
        reply = call(gw, "POST", GW + "/api/generate", key=KEY, body={"model": TINY, "prompt": "x"})
        assert reply["status"] == 503 and reply["headers"]["retry-after"] == str(measured_wait), (measured_wait, reply)
        assert 1 <= measured_wait <= 60
        assert "server busy" in json.loads(reply["body"])["error"]
        # Answered at once by the gateway (no instance touched), as the access log shows.
        busy = [e for e in access_log(gw) if e["status"] == "503"][-1]
        assert busy["upstream"] == "" and busy["pool"] == TINY and float(busy["request_time"]) < 0.1, busy
        assert pools(gw)[TINY]["rejected_full"] >= 1
        assert wait_files(gw, "/tmp/qmax?.json", 4)
        assert all(r["status"] == 200 and r["done"] for r in read_results(gw, "qmax", 4))
    finally:
        rc, out = playbook(os.path.join(SCENARIO, "converge.yml"))
    assert rc == 0, out[-3000:]
    assert pools(gw)[TINY]["queue_max"] == 32


def test_broken_config_is_never_loaded(gw):
    before = gw.file("/etc/nginx/conf.d/herd-gateway.conf").content_string
    rc, out = playbook(os.path.join(SCENARIO, "converge.yml"), "-e",
                       json.dumps({"gateway_extra_config": ["bogus_directive on;"]}))
    assert rc != 0
    assert 'unknown directive "bogus_directive"' in out, out[-3000:]
    assert gw.file("/etc/nginx/conf.d/herd-gateway.conf").content_string == before
    assert call(gw, "GET", GW + "/api/tags", key=KEY)["status"] == 200


def test_conversation_stays_on_its_instance_while_it_has_a_free_slot(gw):
    """Affinity (issue 20): follow-up turns of one chat land on the instance of the first turn; when that instance's
    slots are all taken (by the same conversation's 5-second turns), the next turn goes to the pool's other
    instance. Both then hold the history; the next turn goes to the one that recorded it last (a prompt is recorded
    where it went when the answer's first byte comes back: here the 5-second turns', which end after the moved
    one)."""
    wait_idle(gw)
    addresses = upstreams_of(gw)
    max_conns = {i["key"]: i["max_conns"] for i in pools(gw)[SMALL]["instances"]}
    before = pools(gw)[SMALL]
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"conversation {time.time()}"}]

    def turn(count=1, tokens=2, name="aff"):
        item = {"path": "/api/chat", "body": {"model": SMALL, "stream": False, "messages": history,
                                              "options": {"num_predict": tokens}}}
        gw.check_output(f"cat > /tmp/{name}.json <<'EOF'\n{json.dumps([item] * count)}\nEOF")
        return f"h4-client batch {GW} /tmp/{name}.json --key {KEY} --concurrency {count}"

    def one_turn(command=None):
        (r,) = json.loads(gw.check_output(command or turn()))
        assert r["status"] == 200, r
        history.extend([{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}])
        return addresses[r["upstream"]]

    served = [one_turn() for _ in range(3)]
    home = served[0]
    assert served == [home] * 3, served
    # take every slot of the home instance with this conversation's 5-second turns (100 tokens at 20/s)
    next_turn = turn(name="affnext")
    gw.check_output(f"rm -f /tmp/afffill.out; nohup {turn(max_conns[home], 100, 'afffill')} > /tmp/afffill.tmp "
                    "2>&1 && mv /tmp/afffill.tmp /tmp/afffill.out &")
    deadline = time.monotonic() + 5
    inflight = {}
    while time.monotonic() < deadline:
        inflight = {i["key"]: i["inflight"] for i in pools(gw)[SMALL]["instances"]}
        if inflight[home] == max_conns[home]:
            break
        time.sleep(0.1)
    assert inflight[home] == max_conns[home], inflight
    moved = one_turn(next_turn)
    assert moved != home and POOL_OF[moved] == SMALL, (moved, home)
    assert wait_files(gw, "/tmp/afffill.out", 1, timeout=15)
    fills = json.loads(gw.file("/tmp/afffill.out").content_string)
    assert [(f["status"], addresses[f["upstream"]]) for f in fills] == [(200, home)] * max_conns[home], fills
    assert one_turn() == home  # equal matches: the instance that recorded the history last
    after = wait_idle(gw)[SMALL]
    assert after["affinity"] == "prefix"
    assert after["affinity_new"] - before["affinity_new"] == 1, after
    assert after["affinity_misses"] - before["affinity_misses"] == 1, after
    assert after["affinity_hits"] - before["affinity_hits"] == 2 + max_conns[home] + 1, after


# Hostile and odd requests (issue 26): answered by the gateway itself, none reaches an instance.
HOSTILE = [
    ("POST", "/API/pull", '{"model":"herd-tiny:1b"}', 404), ("POST", "/api/Pull", '{"model":"herd-tiny:1b"}', 404),
    ("POST", "/api/signout", "{}", 404), ("POST", "/api/me", "{}", 404), ("GET", "/api/admin", None, 404),
    ("GET", "/debug/pprof/", None, 404), ("DELETE", "/api/user/keys/x", None, 404), ("GET", "/api/status", None, 404),
    ("GET", "/api/generate", None, 405), ("PUT", "/api/chat", "{}", 405),
    ("POST", "/api/generate", '{"model":"herd-tiny:1b","MODEL":"herd-small:7b","prompt":"x"}', 400),
    ("POST", "/api/generate", '{"model":"herd-small:7b","options":{"num_ctx":1},"OPTIONS":{"num_ctx":131072}}', 400),
    ("POST", "/api/chat", '{"model":"herd-tiny:1b","Keep_Alive":0,"keep_alive":0,"messages":[]}', 400),
    ("POST", "/api/generate", "@/tmp/h26-name.json", 404), ("POST", "/api/show", "@/tmp/h26-show.json", 413),
]
BIG_NAME = ("python3 -c 'import json; print(json.dumps({\"model\": \"a\" + \" \" * 1048576 + \"b\", \"prompt\": \"x\"}))'"
            " > /tmp/h26-name.json; python3 -c 'import json; print(json.dumps({\"model\": \"x\" * 204800}))'"
            " > /tmp/h26-show.json")


def _curl(method, path, body, key=KEY):
    data = ""
    if body is not None:
        data = f"--data-binary {body}" if body.startswith("@") else f"--data-binary '{body}'"
    return (f"curl -s -o /dev/null -w '%{{http_code}}' -X {method} -H 'Authorization: Bearer {key}' {data} "
            f"'{GW}{path}'")


def _ttft(gw, count):
    firsts = []
    for _ in range(count):
        result = stream(gw, tokens=1)
        assert result["status"] == 200 and result["chunk_times"], result
        firsts.append(result["chunk_times"][0])
    return statistics.median(firsts)


def test_hostile_requests_reach_no_instance_and_normal_traffic_keeps_its_ttft(gw):
    wait_idle(gw)
    gw.check_output(BIG_NAME)
    before = len(access_log(gw))
    for method, path, body, status in HOSTILE:
        assert gw.check_output(_curl(method, path, body)) == str(status), (method, path, body)
    entries = access_log(gw)[before:]
    assert [int(e["status"]) for e in entries] == [h[3] for h in HOSTILE], entries
    assert all(e["upstream"] == "" for e in entries), [e for e in entries if e["upstream"]]
    # Normal traffic keeps its first-token time while 4 clients send 1 MiB pathological names (10 each).
    baseline = _ttft(gw, 5)
    gw.check_output("rm -f /tmp/h26-load.*; for c in 1 2 3 4; do (for i in $(seq 1 10); do "
                    + _curl("POST", "/api/generate", "@/tmp/h26-name.json") + "; echo; done > /tmp/h26-load.$c 2>&1 < /dev/null &) ; done")
    under = _ttft(gw, 5)
    assert wait_files(gw, "/tmp/h26-load.*", 4)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and gw.run("cat /tmp/h26-load.* | grep -c 404").stdout.strip() != "40":
        time.sleep(0.5)
    assert gw.run("cat /tmp/h26-load.* | grep -c 404").stdout.strip() == "40"
    _measured(f"TTFT p50 {baseline * 1000:.0f} ms alone, {under * 1000:.0f} ms while 4 clients send 1 MiB "
              "pathological names (40 answered 404 by the gateway, none reached an instance)")
    assert under <= max(2 * baseline, baseline + 0.25), (baseline, under)
    wait_idle(gw)


def test_catalogue_lists_only_the_plans_models_and_each_answers(gw):
    """An instance that still holds a model no pool serves (left on disk by an earlier deploy): the catalogue leaves
    it out, and every model it lists answers 200."""
    ip = gw.check_output("getent ahostsv4 h4-gpu1 | awk 'NR==1{print $1}'")
    direct = f"http://{ip}:11436"
    gw.check_output(f"curl -sf -X POST {direct}/api/copy -d '{{\"source\":\"{SMALL}\",\"destination\":\"herd-stale:1b\"}}'")
    try:
        on_disk = [m["name"] for m in json.loads(gw.check_output(f"curl -sf {direct}/api/tags"))["models"]]
        assert "herd-stale:1b" in on_disk, on_disk
        time.sleep(2.5)  # the catalogue cache (2 s)
        listed = [m["name"] for m in json.loads(call(gw, "GET", GW + "/api/tags", key=KEY)["body"])["models"]]
        assert sorted(listed) == [EMBED, SMALL, TINY], listed
        for name in listed:
            assert call(gw, "POST", GW + "/api/show", key=KEY, body={"model": name})["status"] == 200, name
            reply = call(gw, "POST", GW + "/api/embed", key=KEY, body={"model": name, "input": "hi"}) if name == EMBED \
                else call(gw, "POST", GW + "/api/generate", key=KEY,
                          body={"model": name, "prompt": "hi", "stream": False, "options": {"num_predict": 1}})
            assert reply["status"] == 200, (name, reply)
        assert call(gw, "POST", GW + "/api/generate", key=KEY, body={"model": "herd-stale:1b"})["status"] == 404
    finally:
        gw.run(f"curl -s -X DELETE {direct}/api/delete -d '{{\"model\":\"herd-stale:1b\"}}'")
