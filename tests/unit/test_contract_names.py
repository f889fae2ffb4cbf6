"""No role, playbook or molecule scenario reads another role's underscore (private) names.

Roles talk through published names only: role ollama's plan contract `ollama_instances` / `ollama_gpus`
(docs/architecture.md), each role's documented variables, and files. A private name is `_<role>_...` or
`__<role>_...`; its owner is the longest role name it starts with. Inside roles/<role>/ only the role's own
private names may appear; playbooks/, site.yml and molecule/ use none.
"""

import pathlib
import re

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
ROLES = sorted(p.name for p in (REPO / "roles").iterdir() if p.is_dir())
SUFFIXES = {".yml", ".yaml", ".j2", ".py", ".cfg", ".ini"}
# In YAML and templates every private-looking word counts; in Python only quoted names (hostvars lookups),
# so that a method such as self._gateway() or a helper _gateway_address() is not mistaken for a variable.
WORD = re.compile(r"(?<![\w.])(_{1,2}[a-z][a-z0-9_]*)")
QUOTED = re.compile(r"""["'](_{1,2}[a-z][a-z0-9_]*)["']""")


def owner(name):
    bare = name.lstrip("_")
    matches = [r for r in ROLES if bare.startswith(r + "_")]
    return max(matches, key=len) if matches else None


def private_names(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    pattern = QUOTED if path.suffix == ".py" else WORD
    for number, line in enumerate(text.splitlines(), 1):
        for match in pattern.finditer(line):
            role = owner(match.group(1))
            if role:
                yield number, match.group(1), role


def files(*roots):
    for root in roots:
        root = REPO / root
        candidates = [root] if root.is_file() else sorted(root.rglob("*"))
        for path in candidates:
            if path.is_file() and path.suffix in SUFFIXES:
                yield path


def test_roles_read_only_their_own_private_names():
    found = []
    for role in ROLES:
        for path in files(f"roles/{role}"):
            found += [f"{path.relative_to(REPO)}:{n}: {name} (role {owner_})"
                      for n, name, owner_ in private_names(path) if owner_ != role]
    assert not found, "roles read another role's private names; publish them instead:\n" + "\n".join(found)


def test_playbooks_and_scenarios_read_no_private_role_names():
    found = [f"{path.relative_to(REPO)}:{n}: {name} (role {owner_})"
             for path in files("playbooks", "site.yml", "molecule") for n, name, owner_ in private_names(path)]
    assert not found, "playbooks or molecule read a role's private names; use its published ones:\n" + "\n".join(found)


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "x.yml"
    bad.write_text("loop: \"{{ _ollama_plan }}\"\nx: \"{{ hostvars[h]['__gateway_servers'] }}\"\n")
    assert [(n, name, o) for n, name, o in private_names(bad)] == [(1, "_ollama_plan", "ollama"),
                                                                    (2, "__gateway_servers", "gateway")]
    assert owner("_gateway_vip_router_id") == "gateway_vip" and owner("_plan") is None


def test_the_plan_reads_nothing_of_the_gateway():
    """The gateway consumes the plan: role ollama reads no gateway_* variable and not group gateways."""
    found = []
    for path in files("roles/ollama"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0] if path.suffix in {".yml", ".yaml"} else line
            if re.search(r"(?<![\w.])gateway_[a-z_]+|groups\[['\"]gateways['\"]\]", code):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "role ollama reads the gateway's settings:\n" + "\n".join(found)


# Role ollama's published names (docs/architecture.md): the plan contract, and what its teardown publishes.
OLLAMA_CONTRACT = {"ollama_instances", "ollama_gpus", "ollama_teardown_mode", "ollama_embedding_models"}
# A user's setting that another part reads on purpose, with the reason; nothing else of role ollama's is read.
OLLAMA_SHARED = {
    ("playbooks/smoke.yml", "ollama_ready_timeout"): "smoke waits for a model as long as the role's readiness does",
    ("playbooks/loadtest.yml", "ollama_models"): "runs on the gateways, which have no plan: the first model",
    ("molecule/container/prepare.yml", "ollama_container_image"): "the scenario loads the image its host_vars name",
}
OLLAMA_WORD = re.compile(r"(?<![\w.'\"])(ollama_[a-z0-9_]+)\b")
JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
STRING = re.compile(r"'[^']*'|\"[^\"]*\"")
# Keys whose value is a bare Jinja expression.
BARE = {"when", "that", "failed_when", "changed_when", "until", "loop", "with_items"}
# Names outside role ollama that are built from, not read as, its names.
UNIT_OR_CONTAINER = re.compile(r"ollama@\{\{|ollama@'|herd-ollama-\{\{|['\"]herd-ollama-['\"]|['\"]ollama@['\"]")


def _expressions(path):
    """Every Jinja expression in a YAML file or template, with string literals blanked (messages don't count)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".j2":
        spans = [text]
    else:
        spans = []

        def walk(node, key=None):
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, k)
            elif isinstance(node, list):
                for v in node:
                    walk(v, key)
            elif isinstance(node, str):
                spans.append(node if key in BARE else " ".join(JINJA.findall(node)))
        walk(yaml.safe_load(text))
    for span in spans:
        for expr in (JINJA.findall(span) if path.suffix == ".j2" else [span]):
            yield STRING.sub("''", expr)


def ollama_reads(path, rel):
    for expr in _expressions(path):
        for name in OLLAMA_WORD.findall(expr):
            if name not in OLLAMA_CONTRACT and (rel, name) not in OLLAMA_SHARED:
                yield name


def consumer_files():
    for path in files("site.yml", "playbooks", *[f"roles/{r}" for r in ROLES if r != "ollama"]):
        if path.suffix in {".yml", ".yaml", ".j2"}:
            yield path
    # molecule: only the playbooks (converge, verify, prepare), not the inventories that set role ollama's knobs
    for path in files("molecule"):
        if path.suffix == ".yml" and path.name != "molecule.yml" and "host_vars" not in path.parts \
                and "group_vars" not in path.parts:
            yield path


def test_consumers_read_only_role_ollamas_published_names():
    """Outside role ollama nobody reads ollama_mode or another ollama_* setting: the plan carries what they need."""
    found = []
    for path in consumer_files():
        rel = str(path.relative_to(REPO))
        found += [f"{rel}: {name}" for name in sorted(set(ollama_reads(path, rel)))]
    assert not found, "read role ollama's published names (docs/architecture.md) instead of:\n" + "\n".join(found)


def test_consumers_take_unit_and_container_names_from_the_plan():
    found = []
    for path in consumer_files():
        rel = str(path.relative_to(REPO))
        found += [f"{rel}: {expr.strip()[:80]}" for expr in _expressions(path) if UNIT_OR_CONTAINER.search(expr)]
        text = path.read_text(encoding="utf-8")
        found += [f"{rel}:{n}: {line.strip()[:80]}" for n, line in enumerate(text.splitlines(), 1)
                  if re.search(r"ollama@\{\{|herd-ollama-\{\{|(_prefix:\s*(ollama@|herd-ollama-))", line)]
    assert not found, "use the plan entry's unit, container or name:\n" + "\n".join(found)


def test_the_ollama_checks_can_fail(tmp_path):
    bad = tmp_path / "x.yml"
    bad.write_text("- name: Docker when containers\n  when: ollama_mode | default('systemd') == 'container'\n"
                   "  debug:\n    msg: \"{{ 'ollama_mode is fine in a message' }} {{ ollama_instances }}\"\n"
                   "  loop_control:\n    label: \"ollama@{{ item.id }}\"\n")
    assert list(ollama_reads(bad, "x.yml")) == ["ollama_mode"]
    template = tmp_path / "x.j2"
    template.write_text("{% if ollama_mode == 'container' %}x{% endif %} ollama_mode in text\n")
    assert list(ollama_reads(template, "x.j2")) == ["ollama_mode"]
