"""No role, playbook or molecule scenario reads another role's underscore (private) names.

Roles talk through published names only: role ollama's plan contract `ollama_instances` / `ollama_gpus`
(docs/architecture.md), each role's documented variables, and files. A private name is `_<role>_...` or
`__<role>_...`; its owner is the longest role name it starts with. Inside roles/<role>/ only the role's own
private names may appear; playbooks/, site.yml and molecule/ use none.
"""

import pathlib
import re

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
