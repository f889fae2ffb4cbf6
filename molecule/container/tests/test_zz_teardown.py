"""Last of the verify (file name sorts last): playbooks/teardown.yml removes herd's containers and everything else
herd installed on the container-mode host; the Docker engine keeps running."""

import os
import sys

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_measure import measured  # noqa: E402
from herd_teardown import leftovers, run_teardown  # noqa: E402

# What prepare.yml set up for the lab, not herd's playbooks: the stand-in toolkit repository (its unit, builder and
# files) and the lab image builder; and the doc file of the stand-in toolkit package, which stays installed like
# Docker's packages.
PREPARED = (
    r"herd-lab-nvidia-repo\.service",
    r"^file: /usr/local/lib/herd-lab(/|$)",
    r"^file: /srv/herd-lab(/nvidia-toolkit-repo(/|$)|$)",
    r"^file: /usr/share/doc/nvidia-container-toolkit/README\.herd-lab$",
)


def test_teardown_leaves_no_container_or_file_of_herd(host):
    before = leftovers(host, PREPARED)
    for trace in ("container: herd-ollama-0", "container: herd-ollama-1", "file: /etc/nginx/herd", "account: ollama"):
        assert any(line.startswith(trace) for line in before), f"the scan does not see {trace!r}: {before}"
    seconds, recap = run_teardown()
    measured(f"container: playbooks/teardown.yml took {seconds:.1f} s")
    assert leftovers(host, PREPARED) == [], recap
    assert host.service("docker").is_running
    assert host.service("nginx").is_running
