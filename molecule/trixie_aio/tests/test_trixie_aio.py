"""All-in-one on Debian 13 (trixie), deployed by the installed collection herd.herd: 2 instances of 2 GPUs each and
the gateway; an embedding-only model beside the chat model (warmed with an embed, embedded through the gateway);
the agents' endpoints; the gateway's rate limit answers 429 with Retry-After."""

import json
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_measure import measured  # noqa: E402

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
GPUS = json.load(open(os.path.join(PROJECT, "lab/gpus/l20x4.json")))["gpus"]
GROUPS = [[0, 1], [2, 3]]
BASE_PORT = 11434
MODEL, EMBED = "herd-tiny:1b", "herd-embed:v1"
RATE_LIMIT, RATE_BURST = 10, 10
BURST = 60


def test_host_is_debian_13_with_its_own_nginx_and_python(host):
    assert host.file("/etc/debian_version").content_string.startswith("13.")
    assert "nginx/1.26." in host.run("nginx -v").stderr
    assert host.run("python3 --version").stdout.startswith("Python 3.13.")


def test_collection_run_deployed_from_the_installed_roles():
    log_path = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "collection-run.log")
    with open(log_path, encoding="utf-8") as fh:
        log = fh.read()
    for role in ("ollama", "gateway", "nginx", "exporter", "instance_firewall"):
        assert f"TASK [herd.herd.{role} : " in log, f"role {role} did not run from the collection"
    recap = log[log.rindex("PLAY RECAP"):]
    assert "herd-t13-aio" in recap and "failed=0" in recap and "unreachable=0" in recap, recap


def test_instances_run_on_their_gpu_groups(host):
    for i, group in enumerate(GROUPS):
        svc = host.service(f"ollama@{i}")
        assert svc.is_running, host.run(f"journalctl -u ollama@{i} -n 30 --no-pager").stdout
        assert host.socket(f"tcp://127.0.0.1:{BASE_PORT + i}").is_listening
        env = host.run(f"cat /proc/$(systemctl show -p MainPID --value ollama@{i})/environ | tr '\\0' '\\n'").stdout
        uuids = ",".join(GPUS[g]["uuid"] for g in group)
        assert f"CUDA_VISIBLE_DEVICES={uuids}" in env, env
    assert not host.service(f"ollama@{len(GROUPS)}").is_running


def test_gateway_generates_from_both_instances(host):
    upstreams = set()
    for n in range(6):
        body = json.dumps({"model": MODEL, "prompt": f"trixie {n}", "stream": False, "options": {"num_predict": 4}})
        out = host.run(f"curl -sS -m 20 -D - -H 'Content-Type: application/json' -d '{body}' http://127.0.0.1/api/generate")
        assert out.rc == 0, out.stderr
        head, _, payload = out.stdout.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200"), out.stdout
        assert json.loads(payload)["response"]
        upstreams |= {line.split(":", 1)[1].strip() for line in head.splitlines() if line.lower().startswith("x-herd-upstream:")}
    assert upstreams == {f"127.0.0.1:{BASE_PORT + i}" for i in range(len(GROUPS))}, upstreams


def post(host, path, doc):
    """POST `doc` to the gateway on the host: (status, headers text, body text)."""
    out = host.run(f"curl -sS -m 20 -D - -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(doc))} "
                   f"http://127.0.0.1{path}")
    assert out.rc == 0, out.stderr
    head, _, payload = out.stdout.partition("\r\n\r\n")
    return int(head.split()[1]), head, payload


def test_embedding_model_warmed_with_an_embed_and_embedded_through_the_gateway(host):
    """Warmup read the model's capabilities (embedding only) and loaded it with /api/embed: both instances hold
    both models resident; /api/embed and /v1/embeddings through the gateway answer from them."""
    for i in range(len(GROUPS)):
        ps = json.loads(host.check_output(f"curl -sf http://127.0.0.1:{BASE_PORT + i}/api/ps"))["models"]
        assert sorted(m["name"] for m in ps) == [EMBED, MODEL], ps
    status, _head, body = post(host, "/api/embed", {"model": EMBED, "input": ["one", "two"]})
    vectors = json.loads(body)["embeddings"]
    assert status == 200 and len(vectors) == 2 and len(vectors[0]) == 768, body
    status, _head, body = post(host, "/v1/embeddings", {"model": EMBED, "input": "one"})
    assert status == 200 and json.loads(body)["data"][0]["embedding"] == vectors[0], body
    status, _head, body = post(host, "/api/generate", {"model": EMBED, "prompt": "hi", "stream": False})
    assert status == 400 and "does not support generate" in json.loads(body)["error"], body
    measured(f"trixie_aio embedding model {EMBED}: resident on {len(GROUPS)} instances after warmup, 768-dim vectors")


def test_agent_endpoints_through_the_gateway(host):
    status, _head, body = post(host, "/v1/messages", {"model": MODEL, "max_tokens": 32,
                                                      "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and json.loads(body)["content"][0]["text"], body
    status, head, body = post(host, "/v1/responses", {"model": MODEL, "input": "hi", "stream": True})
    assert status == 200 and "text/event-stream" in head and "event: response.completed" in body, body[-500:]
    status, _head, body = post(host, "/v1/messages", {"model": "nope:1b", "max_tokens": 8, "messages": []})
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error", body


# Sent on the host (loopback is one client address): BURST requests at once, each bounded by a 10 s timeout.
BURST_SCRIPT = r"""
import concurrent.futures, http.client, json
def one(_):
    c = http.client.HTTPConnection("127.0.0.1", 80, timeout=10)
    c.request("GET", "/api/version")
    r = c.getresponse()
    return r.status, r.getheader("Retry-After"), r.read().decode()
with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
    print(json.dumps(list(pool.map(one, range(BURST)))))
"""


def test_rate_limit_answers_429_with_retry_after(host):
    conf = host.file("/etc/nginx/conf.d/herd-gateway.conf").content_string
    assert f"rate={RATE_LIMIT}r/s" in conf and f"burst={RATE_BURST} nodelay" in conf
    out = host.run("python3 -c " + shlex.quote(BURST_SCRIPT.replace("BURST", str(BURST))))
    assert out.rc == 0, out.stderr
    results = json.loads(out.stdout)
    statuses = [status for status, _, _ in results]
    limited = [r for r in results if r[0] == 429]
    measured(f"trixie_aio rate limit {RATE_LIMIT} r/s burst {RATE_BURST}: {BURST} requests at once -> "
             f"{statuses.count(200)} x 200, {len(limited)} x 429")
    assert set(statuses) <= {200, 429}, statuses
    # nodelay: the burst (and what the rate refills meanwhile) passes, the rest is refused at once.
    assert RATE_BURST <= statuses.count(200) < BURST, statuses
    assert limited, statuses
    for _, retry_after, body in limited:
        assert retry_after == "1"
        assert json.loads(body)["error"].startswith("rate limit exceeded")
    # The limit refills: a request after a pause passes again.
    again = host.run("sleep 1.5; curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1/api/version")
    assert again.stdout == "200"
