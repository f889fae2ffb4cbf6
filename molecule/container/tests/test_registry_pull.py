"""Container mode fills the store the same way: the short-lived store container (on docker's default bridge) pulled
from the host's lab registry at the bridge's gateway (ollama_registry in host_vars/h9-ctr.yml), and the store keeps
the model under its plain name."""

import json

STORE = "/var/lib/herd/store/manifests"


def test_the_store_container_pulled_from_the_registry_over_the_bridge(host):
    assert host.service("herd-lab-registry").is_running
    # only Ollama's default host folder: the 172.17.0.1:5000/library/... name was copied to herd-tiny:1b and deleted
    assert host.run(f"ls {STORE}").stdout.split() == ["registry.ollama.ai"]
    stored = json.loads(host.file(f"{STORE}/registry.ollama.ai/library/herd-tiny/1b").content_string)
    served = json.loads(host.check_output("curl -fsS http://127.0.0.1:5000/v2/library/herd-tiny/manifests/1b"))
    assert stored == served
    # the request came from a container on the bridge, not from the host itself
    journal = host.run("journalctl -u herd-lab-registry --no-pager -o cat").stdout
    pulls = [line for line in journal.splitlines() if '"GET /v2/library/herd-tiny/manifests/1b HTTP/1.1" 200' in line]
    assert any(line.startswith("172.17.") for line in pulls), journal[-2000:]
