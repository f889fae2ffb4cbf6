"""herd as the Ansible collection herd.herd (galaxy.yml): built, installed offline, used from another directory.

The collection is built with `ansible-galaxy collection build`, installed from the tarball with `--offline` into
a temporary path, and used from a temporary working directory with no ansible.cfg: `ansible-playbook
herd.herd.site --syntax-check` and `--list-tasks` against the lab inventory, and `ansible-doc` for every filter
and module. A second test keeps the roles calling herd's filters by their full names (inside a collection,
Ansible finds a filter by its short name only in ansible.builtin and configured paths, never in the role's own
collection).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import time

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
GALAXY = yaml.safe_load((REPO / "galaxy.yml").read_text(encoding="utf-8"))
FQCN = f"{GALAXY['namespace']}.{GALAXY['name']}"
FILTER_DIR = REPO / "plugins" / "filter"
MODULE_DIR = REPO / "plugins" / "modules"


def _filter_names():
    """Every filter that a FilterModule under plugins/filter registers (read from the source, no import)."""
    names = []
    for path in sorted(FILTER_DIR.glob("*.py")):
        block = re.search(r"def filters\(self\):\s*return \{(.*?)\}", path.read_text(encoding="utf-8"), re.S)
        assert block, f"{path} has no FilterModule.filters()"
        names += re.findall(r'"(\w+)":', block.group(1))
    return names


FILTERS = _filter_names()
MODULES = sorted(p.stem for p in MODULE_DIR.glob("*.py") if p.stem != "__init__")


def _run(argv, cwd, env, timeout=180):
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc, elapsed


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the collection, install the tarball offline; return (workdir, env, timings)."""
    base = tmp_path_factory.mktemp("collection")
    workdir = base / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", ANSIBLE_NOCOLOR="1", HOME=str(base),
               ANSIBLE_COLLECTIONS_PATH=str(base / "installed"))
    timings = {}
    _, timings["build"] = _run([BIN / "ansible-galaxy", "collection", "build", "--output-path", base, REPO], workdir, env)
    tarball = base / f"{GALAXY['namespace']}-{GALAXY['name']}-{GALAXY['version']}.tar.gz"
    assert tarball.is_file()
    _, timings["install"] = _run(
        [BIN / "ansible-galaxy", "collection", "install", "--offline", "-p", base / "installed", tarball], workdir, env
    )
    root = base / "installed" / "ansible_collections" / GALAXY["namespace"] / GALAXY["name"]
    return {"workdir": workdir, "env": env, "timings": timings, "tarball": tarball, "root": root}


def test_tarball_holds_the_deployment_and_not_the_lab(installed):
    with tarfile.open(installed["tarball"]) as tar:
        names = set(tar.getnames())
    for wanted in ("MANIFEST.json", "meta/runtime.yml", "playbooks/site.yml", "site.yml",
                   "playbooks/preflight.yml", "roles/ollama/tasks/main.yml", "roles/gateway/filter_plugins/gateway.py",
                   "plugins/filter/gateway.py", "plugins/filter/ollama_plan.py", "plugins/filter/ollama_plan.yml",
                   "plugins/modules/nvidia_gpu_info.py"):
        assert wanted in names, wanted
    for unwanted in ("lab", "molecule", "tests", "roles/lab_standins", "playbooks/lab.yml", "collections", ".venv"):
        assert not any(n == unwanted or n.startswith(unwanted + "/") for n in names), unwanted
    # The gateway filters reach plugins/filter through a link that stays inside the collection.
    link = installed["root"] / "plugins" / "filter" / "gateway.py"
    assert link.resolve() == (installed["root"] / "roles" / "gateway" / "filter_plugins" / "gateway.py").resolve()


def test_site_syntax_checks_from_another_directory(installed):
    proc, elapsed = _run(
        [BIN / "ansible-playbook", f"{FQCN}.site", "-i", REPO / "inventories" / "lab" / "hosts.yml", "--syntax-check"],
        installed["workdir"], installed["env"],
    )
    assert f"ansible_collections/{FQCN.replace('.', '/')}/playbooks/site.yml" in proc.stdout
    installed["timings"]["syntax-check"] = elapsed
    print("collection timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in installed["timings"].items()))


def test_every_collection_playbook_syntax_checks(installed):
    playbooks = sorted(p.stem for p in (installed["root"] / "playbooks").glob("*.yml"))
    assert "site" in playbooks and "rolling" in playbooks and "lab" not in playbooks, playbooks
    proc, _ = _run(
        [BIN / "ansible-playbook", "--syntax-check", "-i", REPO / "inventories" / "lab" / "hosts.yml",
         *[f"{FQCN}.{name}" for name in playbooks]],
        installed["workdir"], installed["env"],
    )
    assert proc.stdout.count("playbook: ") == len(playbooks), proc.stdout


def test_site_roles_come_from_the_collection(installed):
    proc, _ = _run(
        [BIN / "ansible-playbook", f"{FQCN}.site", "-i", REPO / "inventories" / "lab" / "hosts.yml", "--list-tasks"],
        installed["workdir"], installed["env"],
    )
    for role in ("docker", "instance_firewall", "ollama", "nginx", "gateway", "exporter"):
        assert f"{FQCN}.{role} : " in proc.stdout, f"role {role} not resolved inside {FQCN}"


def test_every_filter_and_module_renders_in_ansible_doc(installed):
    assert "ollama_plan" in FILTERS and "gateway_servers" in FILTERS
    for kind, names in (("filter", FILTERS), ("module", MODULES)):
        proc, _ = _run([BIN / "ansible-doc", "-t", kind, "--json", *[f"{FQCN}.{n}" for n in names]],
                       installed["workdir"], installed["env"])
        docs = json.loads(proc.stdout)
        for name in names:
            doc = docs[f"{FQCN}.{name}"]["doc"]
            assert doc["short_description"], f"{kind} {name}: no short_description"
            assert doc["description"], f"{kind} {name}: no description"
    proc, _ = _run([BIN / "ansible-doc", "-t", "filter", f"{FQCN}.ollama_plan"], installed["workdir"], installed["env"])
    text = " ".join(proc.stdout.split())
    assert f"FILTER {FQCN}.ollama_plan" in text and "Turns the GPUs of one host and the ollama role's settings" in text


def test_filter_docs_match_the_registered_filters():
    documented = sorted(p.stem for p in FILTER_DIR.glob("*.yml"))
    assert documented == sorted(FILTERS), "plugins/filter/<name>.yml must document exactly the registered filters"


def test_roles_and_playbooks_call_herd_filters_by_full_name():
    """A short name works from the checkout (ansible.cfg filter_plugins) but not inside the installed collection."""
    short = re.compile(r"\|\s*(" + "|".join(map(re.escape, FILTERS)) + r")\b")
    offenders = []
    for path in [*REPO.glob("roles/**/*.yml"), *REPO.glob("roles/**/*.j2"), *REPO.glob("playbooks/**/*.yml"),
                 REPO / "site.yml"]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if short.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, f"call these as {FQCN}.<filter>:\n" + "\n".join(offenders)
