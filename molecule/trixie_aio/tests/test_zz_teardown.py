"""Last of the verify (file name sorts last): playbooks/teardown.yml removes everything herd installed on the
all-in-one host (instances, gateway, exporter, guard, firewall, lab stand-ins) and nginx keeps running."""

import os
import sys

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_measure import measured  # noqa: E402
from herd_teardown import leftovers, run_teardown  # noqa: E402


def test_teardown_leaves_nothing_of_herd(host):
    before = leftovers(host)
    for trace in ("unit: ollama@0.service", "unit: herd-exporter.service", "file: /etc/nginx/herd", "account: ollama"):
        assert any(line.startswith(trace) for line in before), f"the scan does not see {trace!r}: {before}"
    seconds, recap = run_teardown()
    measured(f"trixie_aio: playbooks/teardown.yml took {seconds:.1f} s")
    assert leftovers(host) == [], recap
    assert host.service("nginx").is_running
    assert host.run("nginx -t").rc == 0
