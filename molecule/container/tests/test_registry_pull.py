"""Container mode fills the store the same way: the short-lived store container (on the host's network, bound to
loopback) pulled from the lab registry (ollama_registry, inventories/lab), and the store keeps the model under its
plain name."""

import json

STORE = "/var/lib/herd/store/manifests"


def test_the_store_container_pulled_from_the_registry(host):
    assert host.service("herd-lab-registry").is_running
    # only Ollama's default host folder: the 127.0.0.1:5000/library/... name was copied to herd-tiny:1b and deleted
    assert host.run(f"ls {STORE}").stdout.split() == ["registry.ollama.ai"]
    stored = json.loads(host.file(f"{STORE}/registry.ollama.ai/library/herd-tiny/1b").content_string)
    served = json.loads(host.check_output("curl -fsS http://127.0.0.1:5000/v2/library/herd-tiny/manifests/1b"))
    assert stored == served
    journal = host.run("journalctl -u herd-lab-registry --no-pager -o cat").stdout
    assert '"GET /v2/library/herd-tiny/manifests/1b HTTP/1.1" 200' in journal, journal[-2000:]
