"""Real HTTP behaviour through the gateway on h4-gw (nginx from roles nginx + gateway, lab Ollama emulators)."""

import json
import os
import statistics
import sys
import time

from conftest import GW, KEY, SCENARIO, call, dump_journal, playbook, stream

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_measure import measured as _measured  # noqa: E402


def upstreams_of(gw):
    """Every instance's address as nginx reports it in X-Herd-Upstream."""
    ip = gw.check_output("getent ahostsv4 h4-gpu1 | awk 'NR==1{print $1}'")
    return {f"{ip}:11434": "h4-gpu1:0", f"{ip}:11435": "h4-gpu1:1", "127.0.0.1:11434": "h4-gw:0"}


def test_nginx_runs_and_config_is_valid(gw):
    assert gw.service("nginx").is_running, dump_journal(gw)
    assert gw.run("nginx -t -q").rc == 0
    conf = gw.file("/etc/nginx/conf.d/herd-gateway.conf")
    assert conf.mode == 0o644 and conf.user == "root"
    assert gw.file("/etc/nginx/herd/gateway-keys.conf").mode == 0o600
    assert "least_conn;" in gw.file("/etc/nginx/herd/gateway-upstream.conf").content_string
    assert gw.socket("tcp://0.0.0.0:80").is_listening and gw.socket("tcp://0.0.0.0:443").is_listening


def test_health_answers_without_backend(gw):
    reply = call(gw, "GET", GW + "/herd/health")
    assert reply["status"] == 200 and json.loads(reply["body"]) == {"status": "ok"}
    assert reply["headers"].get("x-herd-upstream", "") == ""


def test_requests_reach_every_instance(gw):
    seen = [call(gw, "GET", GW + "/api/tags", key=KEY)["headers"]["x-herd-upstream"] for _ in range(12)]
    assert set(seen) == set(upstreams_of(gw)), seen
    log = gw.file("/var/log/nginx/herd-gateway.access.log").content_string.splitlines()
    entry = json.loads(log[-1])
    for field in ("upstream", "upstream_status", "upstream_connect_time", "upstream_header_time",
                  "upstream_response_time", "request_time"):
        assert entry[field] != "", field
    assert entry["key"] == "team-a" and entry["upstream"] in upstreams_of(gw)


def test_allowlist_and_keys(gw, client):
    assert call(gw, "GET", GW + "/api/tags", key=KEY)["status"] == 200
    missing = call(gw, "GET", GW + "/api/tags")
    assert missing["status"] == 401 and "error" in json.loads(missing["body"])
    assert missing["headers"]["www-authenticate"].startswith("Bearer")
    assert call(gw, "GET", GW + "/api/tags", key="h4-wrong-key-000000000000")["status"] == 401
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
    gateway = [stream(gw, tokens=3)["chunk_times"][0] for _ in range(8)]
    direct = [stream(gw, url="http://127.0.0.1:11434/api/generate", tokens=3)["chunk_times"][0] for _ in range(8)]
    _measured(f"TTFT median gateway {statistics.median(gateway) * 1000:.1f} ms, "
          f"direct {statistics.median(direct) * 1000:.1f} ms")
    assert statistics.median(gateway) - statistics.median(direct) < 0.05, (gateway, direct)


def test_all_busy_answers_explicit_503_not_502(gw):
    # max_conns: h4-gpu1:0 2+1, h4-gpu1:1 1+1, h4-gw:0 1+1 = 7 admitted at once.
    gw.check_output("rm -f /tmp/busy*.json*; for i in 1 2 3 4 5 6 7; do "
                    f"nohup h4-client stream {GW}/api/generate --key {KEY} --tokens 60 --out /tmp/busy$i.json "
                    ">/dev/null 2>&1 & done")
    time.sleep(1.5)
    reply = call(gw, "POST", GW + "/api/generate", key=KEY, body={"model": "herd-tiny:1b", "prompt": "x"})
    assert reply["status"] == 503, reply
    assert reply["headers"]["retry-after"] == "3"
    assert "server busy" in json.loads(reply["body"])["error"]
    # Answered at once by the gateway (no instance touched), as the access log shows.
    busy = [json.loads(line) for line in gw.file("/var/log/nginx/herd-gateway.access.log").content_string.splitlines()
            if '"status":"503"' in line][-1]
    assert busy["upstream"] == "herd_ollama" and float(busy["request_time"]) < 0.1, busy
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and gw.run("ls /tmp/busy?.json 2>/dev/null | wc -l").stdout.strip() != "7":
        time.sleep(0.5)
    results = [json.loads(gw.file(f"/tmp/busy{i}.json").content_string) for i in range(1, 8)]
    assert all(r["status"] == 200 and r["done"] for r in results), results
    assert {r["upstream"] for r in results} == set(upstreams_of(gw))


def test_drain_keeps_inflight_stream_and_removes_server(gw):
    gw.check_output("rm -f /tmp/drain.json*; "
                    f"nohup h4-client stream {GW}/api/generate --key {KEY} --tokens 160 --out /tmp/drain.json "
                    ">/dev/null 2>&1 &")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not gw.file("/tmp/drain.json.upstream").exists:
        time.sleep(0.1)
    address = gw.file("/tmp/drain.json.upstream").content_string.strip()
    target = upstreams_of(gw)[address]
    try:
        rc, out = playbook("playbooks/drain.yml", "-e", f"drain={target}")
        assert rc == 0, out
        # The playbook returned only once the in-flight stream had ended (its result file is written at the end).
        assert gw.file("/tmp/drain.json").exists, "drain returned while the stream was still running"
        assert "no request in flight" in out
        result = json.loads(gw.file("/tmp/drain.json").content_string)
        assert result["status"] == 200 and result["done"] and result["chunks"] >= 160, result
        conf = gw.file("/etc/nginx/herd/gateway-upstream.conf").content_string
        assert sum(line.strip().endswith(" down;") for line in conf.splitlines()) == 1, conf
        seen = {call(gw, "GET", GW + "/api/tags", key=KEY)["headers"]["x-herd-upstream"] for _ in range(9)}
        assert address not in seen and len(seen) == 2, seen
        assert json.loads(gw.file("/var/lib/herd/gateway/drained.json").content_string) == [target]
    finally:
        rc, out = playbook("playbooks/drain.yml", "-e", f"undrain={target}")
    assert rc == 0, out
    seen = {call(gw, "GET", GW + "/api/tags", key=KEY)["headers"]["x-herd-upstream"] for _ in range(12)}
    assert address in seen
    assert " down;" not in gw.file("/etc/nginx/herd/gateway-upstream.conf").content_string


def test_broken_config_is_never_loaded(gw):
    before = gw.file("/etc/nginx/conf.d/herd-gateway.conf").content_string
    rc, out = playbook(os.path.join(SCENARIO, "converge.yml"), "-e",
                       json.dumps({"gateway_extra_config": ["bogus_directive on;"]}))
    assert rc != 0
    assert 'unknown directive "bogus_directive"' in out, out[-3000:]
    assert gw.file("/etc/nginx/conf.d/herd-gateway.conf").content_string == before
    assert call(gw, "GET", GW + "/api/tags", key=KEY)["status"] == 200
