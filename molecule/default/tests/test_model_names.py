"""A model written without a tag (issue 18): host_vars say `herd-small`, and everywhere herd and Ollama name it,
it is Ollama's `herd-small:latest` (registry.ollama.ai/library/herd-small:latest).

The lab registry publishes herd-small:latest as the same manifest as herd-small:7b, as Ollama's library tags
`latest`. Every check reads real state: the model store and each instance's copy on disk, what each instance
reports (/api/ps), the gateway's pools and access log, and the exporter's metrics. Runs before the rolling and
keep_alive tests (file order), while both models are resident.
"""

import hashlib
import json
import os
import sys

import yaml

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
sys.path.insert(0, os.path.join(PROJECT, "tests", "unit", "exporter"))
import promcheck  # noqa: E402

HOST_VARS = os.path.join(PROJECT, "molecule", "default", "host_vars", "herd-mol-aio.yml")
REGISTRY = os.path.join(PROJECT, "lab", "build", "registry")  # what the lab registry serves (make lab-artifacts)
GPUS = 4
BASE_PORT = 11434
CONFIGURED = "herd-small"
REPORTED = "herd-small:latest"  # Ollama's name for it: /api/ps and /api/tags always say name:tag
# What Ollama reports (/api/ps, /api/tags) for each name host_vars configure.
AS_REPORTED = {"herd-tiny:1b": "herd-tiny:1b", CONFIGURED: REPORTED}
LIBRARY = "manifests/registry.ollama.ai/library"
MANIFEST = f"{LIBRARY}/herd-small/latest"
# Every way a client may write the same model; the gateway must send each to the one pool.
SPELLINGS = ["herd-small", "herd-small:latest", "library/herd-small:latest", "registry.ollama.ai/library/herd-small"]


def configured_names():
    with open(HOST_VARS) as handle:
        return [m["name"] if isinstance(m, dict) else m for m in yaml.safe_load(handle)["ollama_models"]]


def pools(host):
    return {p["name"]: p for p in json.loads(host.check_output("curl -fsS http://127.0.0.1/herd/pools"))["pools"]}


def test_the_scenario_configures_the_model_without_a_tag():
    assert CONFIGURED in configured_names(), f"{HOST_VARS} no longer names {CONFIGURED!r} without a tag"


def test_store_and_every_instance_hold_the_latest_tag_only(host):
    """The pull of `herd-small` asked the registry for tag latest; the store and each copy hold that tag alone."""
    with open(os.path.join(REGISTRY, MANIFEST), "rb") as handle:
        published = handle.read()
    with open(os.path.join(REGISTRY, LIBRARY, "herd-small", "7b"), "rb") as handle:
        assert handle.read() == published, "the lab registry's herd-small:latest is not herd-small:7b"
    # A pull writes the manifest as Ollama marshals it (same content, its own bytes): the store holds that, and
    # every instance's copy is the store's byte for byte.
    stored = host.file(f"/var/lib/herd/store/{MANIFEST}").content
    assert json.loads(stored) == json.loads(published)
    digest = hashlib.sha256(stored).hexdigest()
    dirs = ["/var/lib/herd/store"] + [f"/var/lib/herd/instances/{i}/models" for i in range(GPUS)]
    for models in dirs:
        assert host.file(f"{models}/{MANIFEST}").content == stored, models
        assert host.check_output(f"ls {models}/{LIBRARY}/herd-small") == "latest", models
        layers = json.loads(published)["layers"]
        assert all(host.file(f"{models}/blobs/" + layer["digest"].replace(":", "-")).size == layer["size"]
                   for layer in layers), models
    # What each instance has loaded is that manifest (/api/ps digest = sha256 of the manifest file).
    for i in range(GPUS):
        ps = json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{BASE_PORT + i}/api/ps"))["models"]
        loaded = {m["name"]: m["digest"] for m in ps}
        assert loaded.get(REPORTED) == digest, (i, ps)
        assert CONFIGURED not in loaded, (i, ps)


def test_instances_are_in_service_for_the_model(host):
    """Warmup and readiness passed for it: its pool holds every instance, none drained or failed."""
    pool = pools(host)[REPORTED]
    assert sorted(s["endpoint"] for s in pool["instances"]) == [f"127.0.0.1:{BASE_PORT + i}" for i in range(GPUS)]
    assert not [s for s in pool["instances"] if s["down"]], pool
    assert CONFIGURED not in pools(host)


def test_gateway_sends_every_spelling_to_the_one_pool(host):
    before = pools(host)
    lines_before = int(host.check_output("wc -l < /var/log/nginx/herd-gateway.access.log"))
    endpoints = {f"127.0.0.1:{BASE_PORT + i}" for i in range(GPUS)}
    for n, model in enumerate(SPELLINGS):
        out = host.run(
            "curl -sS -m 30 -D - -o /tmp/names.json http://127.0.0.1/api/generate "
            f"""-d '{{"model":"{model}","prompt":"names {n}","stream":false,"options":{{"num_predict":2}}}}'"""
        )
        assert out.rc == 0 and " 200 " in out.stdout.splitlines()[0], (model, out.stdout, out.stderr)
        upstream = [ln.split(":", 1)[1].strip() for ln in out.stdout.splitlines()
                    if ln.lower().startswith("x-herd-upstream:")]
        assert upstream and upstream[0] in endpoints, (model, out.stdout)
        assert json.loads(host.file("/tmp/names.json").content_string)["done"] is True
    after = pools(host)
    assert set(after) == set(before)  # no pool appeared for a spelling
    grown = {name: after[name]["admitted"] - before[name]["admitted"] for name in after}
    assert grown[REPORTED] == len(SPELLINGS), grown
    assert all(v == 0 for name, v in grown.items() if name != REPORTED), grown
    log = host.check_output(f"tail -n +{lines_before + 1} /var/log/nginx/herd-gateway.access.log")
    entries = [json.loads(line) for line in log.splitlines() if '"/api/generate"' in line]
    assert [(e["pool"], e["status"]) for e in entries] == [(REPORTED, "200")] * len(SPELLINGS), entries


def test_exporter_names_the_model_once(host):
    """Per-instance model metrics (from /api/ps) and the pool metrics (from /herd/pools) use one name."""
    out = host.run("curl -fsS http://127.0.0.1:9855/metrics")
    assert out.rc == 0, out.stderr
    text = out.stdout
    fams = promcheck.parse(text)
    wanted = {AS_REPORTED[name] for name in configured_names()}
    for i in range(GPUS):
        held = {s[1]["model"] for s in fams["herd_instance_model_vram_bytes"]["samples"] if s[1]["instance_id"] == str(i)}
        assert held == wanted, (i, held)
    assert {s[1]["pool"] for s in fams["herd_gateway_pool_queue_max"]["samples"]} == wanted
    assert f'model="{CONFIGURED}"' not in text and f'pool="{CONFIGURED}"' not in text
