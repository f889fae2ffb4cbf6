"""The store was filled by a pull from a site registry (ollama_registry): the lab's herd-lab-registry, Ollama's
registry protocol over plain http (lab/standins/lab_registry.py), as a site's own mirror would serve it."""

import json

STORE = "/var/lib/herd/store/manifests"
REGISTRY = "127.0.0.1:5000"  # ollama_registry in inventories/lab/group_vars/all.yml


def test_the_lab_registry_serves_the_protocol(host):
    assert host.service("herd-lab-registry").is_running
    ping = host.run(f"curl -fsS -o /dev/null -w '%{{http_code}}' http://{REGISTRY}/v2/")
    assert ping.stdout == "200", ping.stderr


def test_the_store_keeps_each_pulled_model_under_its_plain_name(host):
    # Ollama stores a pull under the name pulled (127.0.0.1:5000/library/...): herd copied each model to its plain
    # name with /api/copy and deleted the registry-prefixed one, so only Ollama's default host folder is left.
    assert host.run(f"ls {STORE}").stdout.split() == ["registry.ollama.ai"]
    names = host.run(f"cd {STORE}/registry.ollama.ai/library && ls -d */*").stdout.split()
    assert names, "the store holds no model"
    journal = host.run("journalctl -u herd-lab-registry --no-pager -o cat").stdout
    for name in names:
        model, tag = name.split("/")
        # the manifest came over the protocol from the registry, and equals the registry's own (same layers)
        assert f'"GET /v2/library/{model}/manifests/{tag} HTTP/1.1" 200' in journal, journal[-2000:]
        served = json.loads(host.check_output(f"curl -fsS http://{REGISTRY}/v2/library/{model}/manifests/{tag}"))
        stored = json.loads(host.file(f"{STORE}/registry.ollama.ai/library/{name}").content_string)
        assert stored == served
        for layer in stored["layers"] + [stored["config"]]:
            digest = layer["digest"]
            # fetched once over the protocol (a blob two models share, by the first of them)
            assert f'/blobs/{digest} HTTP/1.1" 307' in journal
            assert host.file("/var/lib/herd/store/blobs/" + digest.replace(":", "-")).size == layer["size"]
    # the short-lived store instance that pulled is stopped again
    assert not host.service("ollama@store").is_running
