"""The real-binary lane: herd's ollama role with REAL Ollama (0.3.6, lab/build-real-ollama.sh) on a CPU-only host.

What the real server proves here: herd's archive install path unpacks it, herd's unit and environment run it, each
instance binds only where the plan says, the store instance pulls the model from a site registry (the lab's,
ollama_registry) and herd keeps it under its plain name, each instance lists the model (configured without a tag)
with the store's digest, and a restart keeps the copy. Warmup is off on this host (ollama_warmup: false in molecule.yml): the real binary
cannot generate here (its runners need an Intel GPU), so a loaded model is never asserted. herd's gateway fronts
the two instances: the real server's own queue overflow (OLLAMA_MAX_QUEUE 1) reaches a client through it as 503
with herd's Retry-After.
"""

import hashlib
import json
import shlex
import time

testinfra_hosts = ["ansible://h3_real_hosts"]

REAL_VERSION = "0.3.6-ipexllm-20241101"
PORTS = {0: 11434, 1: 11435}
MODEL = "herd-real-tiny:latest"
STORE_MANIFEST = "/var/lib/herd/store/manifests/registry.ollama.ai/library/herd-real-tiny/latest"
GATEWAY_PORT = 80  # gateway_http_port's default
LAB_REGISTRY = "127.0.0.1:5000"  # herd-lab-registry (prepare.yml), where the store instance pulled from
ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
# Sent from the host itself (loopback): bursts of 8 concurrent generates, at most 3, each request at most 30 s.
# The gateway gives each instance 4 at once (num_parallel 1 + gateway_queue_per_instance 3); the real server takes
# 1 plus 1 queued (OLLAMA_MAX_QUEUE 1) and answers the rest 503 at once. The ones it takes fail with 500 within
# milliseconds (no runner can start here), so a slow burst may miss the overflow: hence a second and third.
BURST_SCRIPT = """
import concurrent.futures, http.client, json, threading
BURST, BURSTS, PORT = 8, 3, %d
BODY = json.dumps({"model": "herd-real-tiny", "prompt": "hi", "stream": False})
def send(barrier):
    barrier.wait(10)
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    try:
        conn.request("POST", "/api/generate", body=BODY)
        resp = conn.getresponse()
        return {"status": resp.status, "retry_after": resp.getheader("Retry-After"),
                "upstream": resp.getheader("X-Herd-Upstream"), "body": resp.read().decode(errors="replace")}
    except OSError as exc:
        return {"status": 0, "body": repr(exc)}
    finally:
        conn.close()
answers = []
for _ in range(BURSTS):
    barrier = threading.Barrier(BURST)
    with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        answers += list(pool.map(lambda _i: send(barrier), range(BURST)))
    if any(a["status"] == 503 for a in answers):
        break
print(json.dumps(answers))
"""


def get_json(host, port, path):
    out = host.run(f"curl -fsS --max-time 5 http://127.0.0.1:{port}{path}")
    assert out.rc == 0, out.stderr
    return json.loads(out.stdout)


def wait_for_version(host, port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = host.run(f"curl -fsS --max-time 2 http://127.0.0.1:{port}/api/version")
        if out.rc == 0:
            return json.loads(out.stdout)["version"]
        time.sleep(0.5)
    raise AssertionError(f"instance on port {port} did not answer within {timeout} s")


def store_digest(host):
    return hashlib.sha256(host.file(STORE_MANIFEST).content).hexdigest()


def test_real_binary_installed_from_the_release_archive(host):
    link = host.file("/usr/local/bin/ollama")
    assert link.is_symlink and link.linked_to == "/opt/ollama/0.3.6/bin/ollama"
    binary = host.file("/opt/ollama/0.3.6/bin/ollama")
    assert binary.mode == 0o755 and binary.size > 40_000_000  # the 52.6 MB Go ELF, not the emulator script
    assert binary.content[:4] == b"\x7fELF"


def test_every_instance_is_the_real_server_under_herds_unit(host):
    for instance, port in PORTS.items():
        service = host.service(f"ollama@{instance}")
        assert service.is_enabled and service.is_running
        assert wait_for_version(host, port) == REAL_VERSION
        env = host.file(f"/etc/herd/ollama/{instance}.env").content_string
        assert f'OLLAMA_HOST="127.0.0.1:{port}"' in env
        assert 'OLLAMA_NOPRUNE="1"' in env
        assert f'OLLAMA_MODELS="/var/lib/herd/instances/{instance}/models"' in env


def test_instances_bind_only_where_planned(host):
    # Nothing else than the gateway and the lab registry listens on this host, so every other TCP listener must be
    # one of the planned instance addresses (ss cannot name the owner: the units run with ProtectProc=invisible).
    out = host.run("ss -Hltn")
    assert out.rc == 0, out.stderr
    listening = sorted(line.split()[3] for line in out.stdout.splitlines())
    planned = [f"127.0.0.1:{port}" for port in PORTS.values()] + [f"0.0.0.0:{GATEWAY_PORT}"]
    assert listening == sorted([*planned, LAB_REGISTRY]), out.stdout
    # The short-lived store instance is not left running (it pulled, then stopped).
    assert not host.service("ollama@store").is_running


def test_the_real_server_pulled_the_store_from_the_registry(host):
    # Ollama 0.3.6's downloader: HEAD for the size, GET answered with a redirect to another host name, then
    # ranged GETs (206); the emulator fetches with one plain GET, so the 206s are the real client's.
    journal = host.run("journalctl -u herd-lab-registry --no-pager -o cat").stdout
    assert '"GET /v2/library/herd-real-tiny/manifests/latest HTTP/1.1" 200' in journal, journal[-2000:]
    stored = json.loads(host.file(STORE_MANIFEST).content_string)
    for layer in stored["layers"] + [stored["config"]]:
        assert f'"HEAD /v2/library/herd-real-tiny/blobs/{layer["digest"]} HTTP/1.1" 200' in journal
        assert f'"GET /blobs/{layer["digest"]} HTTP/1.1" 206' in journal
    # Stored under the plain name only: herd copied 127.0.0.1:5000/library/herd-real-tiny:latest to herd-real-tiny
    # with the real /api/copy and deleted the prefixed name with the real /api/delete.
    assert host.run("ls /var/lib/herd/store/manifests").stdout.split() == ["registry.ollama.ai"]
    served = json.loads(host.check_output("curl -fsS http://127.0.0.1:5000/v2/library/herd-real-tiny/manifests/latest"))
    assert [layer["digest"] for layer in stored["layers"]] == [layer["digest"] for layer in served["layers"]]


def test_every_instance_lists_the_tagless_model_with_the_store_digest(host):
    digest = store_digest(host)
    for port in PORTS.values():
        models = get_json(host, port, "/api/tags")["models"]
        assert [(m["name"], m["digest"]) for m in models] == [(MODEL, digest)]
        show = host.run(f"curl -fsS --max-time 5 http://127.0.0.1:{port}/api/show -d '{{\"model\": \"herd-real-tiny\"}}'")
        assert show.rc == 0, show.stderr
        assert json.loads(show.stdout)["model_info"]["general.architecture"] == "llama"
        # Nothing loaded: warmup is off on this host (the real binary cannot run a model here).
        assert get_json(host, port, "/api/ps") == {"models": []}


def test_a_restart_keeps_the_copy(host):
    digest = store_digest(host)
    blobs_before = host.run("ls /var/lib/herd/instances/1/models/blobs").stdout.split()
    assert len(blobs_before) == 2, blobs_before
    restart = host.run("systemctl restart ollama@1")
    assert restart.rc == 0, restart.stderr
    assert wait_for_version(host, PORTS[1]) == REAL_VERSION
    assert [(m["name"], m["digest"]) for m in get_json(host, PORTS[1], "/api/tags")["models"]] == [(MODEL, digest)]
    assert host.run("ls /var/lib/herd/instances/1/models/blobs").stdout.split() == blobs_before
    journal = host.run("journalctl --no-pager -u ollama@1 --since '-2min'").stdout
    assert "unused blobs removed" not in journal


def test_releases_older_than_the_previous_one_are_removed(host):
    # prepare.yml left 0.1.0 and 0.2.0 (active before this upgrade to 0.3.6), each with its cached archive.
    listing = sorted(host.run("ls /opt/ollama").stdout.split())
    assert listing == ["0.2.0", "0.3.6", "ollama-linux-amd64-0.2.0.tgz", "ollama-linux-amd64-0.3.6.tgz"], listing


def test_the_real_servers_queue_overflow_reaches_the_client_as_503_with_herds_retry_after(host):
    retry_after = str(host.ansible.get_variables()["gateway_retry_after"])
    out = host.run(f"timeout 120 python3 -c {shlex.quote(BURST_SCRIPT % GATEWAY_PORT)}")
    assert out.rc == 0, out.stderr
    answers = json.loads(out.stdout)
    summary = [(a["status"], a["body"]) for a in answers]
    busy = [a for a in answers if a["status"] == 503]
    assert busy, summary
    for answer in busy:
        # Real Ollama's body from the instance (X-Herd-Upstream names it), and the gateway's Retry-After.
        assert json.loads(answer["body"]) == {"error": ERR_MAX_QUEUE}, answer
        assert answer["upstream"] in {f"127.0.0.1:{port}" for port in PORTS.values()}, answer
        assert answer["retry_after"] == retry_after, answer
    # The requests an instance let in fail with 500 (the runner cannot start here: expected, see above; 200 would
    # be right where a runner can start). Nothing else (no 502, no client timeout) may come back.
    assert {a["status"] for a in answers} <= {200, 500, 503}, summary
