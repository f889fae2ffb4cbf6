"""Container mode's instance firewall (runs after the other checks, before the teardown): Docker requires herd's
firewall unit; a packet routed straight to an instance container's own address (from a network namespace on the
host that stands for a non-gateway machine routed through it) is refused, even though Docker publishes the ports on
127.0.0.1 only; the host itself (the gateway) still reaches every instance; both stay true after
`systemctl restart nftables` (Debian's `flush ruleset`, which also removes Docker's own rules). Docker is restarted
at the end to put its rules back. Every wait is bounded."""

import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_measure import measured  # noqa: E402

PORTS = (11434, 11435)
NS = "herd-fw-outsider"
SETUP = (
    f"ip netns add {NS} && ip link add herd-fw0 type veth peer name herd-fw1 && ip link set herd-fw1 netns {NS} && "
    "ip addr add 192.0.2.1/30 dev herd-fw0 && ip link set herd-fw0 up && "
    f"ip -n {NS} addr add 192.0.2.2/30 dev herd-fw1 && ip -n {NS} link set herd-fw1 up && "
    f"ip -n {NS} link set lo up && ip -n {NS} route add default via 192.0.2.1"
)
CLEANUP = f"ip netns del {NS}; ip link del herd-fw0"


def _refused(host):
    m = re.search(r"ct original proto-dst @instance_ports counter packets (\d+)", host.run("nft list chain inet herd_instances forward").stdout)
    return int(m.group(1)) if m else None


def _answers(host, port):
    return host.run(f"curl -sf -m 3 http://127.0.0.1:{port}/api/version").rc == 0


def test_the_forward_path_to_the_containers_is_closed_across_an_nftables_restart(host):
    assert host.run("nft list table inet herd_instances").rc == 0, "no herd table in container mode"
    props = host.run("systemctl show -p Requires -p After docker.service").stdout
    assert re.search(r"^Requires=.*herd-instance-firewall\.service", props, re.M), props
    assert re.search(r"^After=.*herd-instance-firewall\.service", props, re.M), props
    addresses = [host.check_output("docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "
                                   f"herd-ollama-{i}") for i in range(len(PORTS))]
    started = time.monotonic()
    host.run(CLEANUP)
    setup = host.run(SETUP)
    assert setup.rc == 0, setup.stderr
    try:
        for phase in ("deployed", "after systemctl restart nftables"):
            if phase != "deployed":
                assert host.run("systemctl restart nftables").rc == 0
                assert host.run("nft list table inet herd_instances").rc == 0, "herd's table is gone"
            before = _refused(host)
            for address, port in zip(addresses, PORTS, strict=True):
                out = host.run(f"ip netns exec {NS} curl -sS -m 3 -o /dev/null http://{address}:{port}/api/version")
                # Deployed, Docker's own FORWARD rules stand in the path too; after the flush only herd's table does.
                assert out.rc != 0, f"a non-gateway address reached the container {address}:{port} ({phase})"
                if phase != "deployed":
                    assert out.rc == 7, f"{address}:{port} was not refused by herd's rule ({phase}): {out.stderr}"
                assert _answers(host, port), f"the gateway (this host) lost instance port {port} ({phase})"
            if phase != "deployed":
                assert _refused(host) >= before + len(PORTS), host.run("nft list table inet herd_instances").stdout
    finally:
        host.run(CLEANUP)
        # Docker's own rules went with the flush: a restart puts them back (the instances restart with it).
        host.run("systemctl restart docker")
    back = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(_answers(host, port) for port in PORTS):
            back = time.monotonic()
            break
        time.sleep(1)
    assert back is not None, host.run("docker ps -a; journalctl -u docker -n 30 --no-pager").stdout
    measured(f"container: routed packets to both instance containers refused before and after `systemctl restart "
             f"nftables`, loopback kept; check and docker restart took {back - started:.1f} s")
