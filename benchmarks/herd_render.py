"""Render herd's gateway for the benchmark exactly as role gateway renders it, into a private prefix.

The role's own tasks do the work: benchmarks/render_gateway.yml runs role gateway's main entry point with
ansible-playbook from the project's venv, on a copy of the role from which only the tasks that install
packages or drive services are removed (apt, package, service, systemd...: the benchmark uses this machine's
nginx and starts its own). So every template and file the role writes, its filter plugins, defaults, vars and
argument specs, and the role's nginx -t checker on each file before it lands, are the deployment's own. Only
what the benchmark must change is overridden:

- every absolute filesystem path among the role's defaults and vars is moved under the prefix
  (/etc/nginx/herd/x.conf -> PREFIX/etc/nginx/herd/x.conf), so a new file or path variable of the role
  flows in without an edit here;
- gateway_http_port, the instance list (host `bench`'s `ollama_instances`, turned into servers by the role's
  gateway_servers filter) and whatever the caller passes in `overrides`.

nginx's main configuration is this machine's own (/etc/nginx copied into the prefix as role nginx leaves
it: default site removed, conf.d holding only what the gateway role renders), so the modules Debian loads
(modules-enabled) are loaded the same way. Any failure (template error, filter error, nginx -t) raises
RenderError with Ansible's output: nothing is silently rendered from something else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK = ROOT / "benchmarks" / "render_gateway.yml"
SYSTEM_NGINX = Path("/etc/nginx")
# Values of the role's defaults and vars that are filesystem paths (moved under the prefix).
FS_ROOTS = ("/etc/", "/var/", "/usr/", "/run/", "/opt/", "/srv/", "/lib/", "/tmp/")
# Modules whose tasks are removed from the benchmark's copy of the role: they install packages or drive this
# machine's services, which the benchmark must leave alone.
SKIPPED_MODULES = {
    f"{ns}{m}" for ns in ("", "ansible.builtin.", "ansible.legacy.")
    for m in ("apt", "package", "dnf", "yum", "apt_key", "apt_repository", "deb822_repository", "service",
              "systemd", "systemd_service", "reboot")
}
# A task argument naming a fixed system path (not a variable): it would write outside the prefix.
FIXED_PATH = re.compile(r"^\s*(dest|path|src|file):\s*[\"']?/(etc|var|usr|run|opt|srv|lib)/", re.M)


class RenderError(RuntimeError):
    """The role's tasks failed to render the gateway (template, filter or nginx -t error)."""


@dataclass
class Prefix:
    """A private nginx tree: PREFIX/etc/nginx/nginx.conf runs nginx with logs and pid under PREFIX."""

    path: Path
    files: list[Path] = field(default_factory=list)
    origin: str = ""
    render_seconds: float = 0.0
    skipped_tasks: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.path / "etc" / "nginx" / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.path / "var" / "log" / "nginx" / "error.log"

    def nginx_argv(self, nginx: str = "nginx") -> list[str]:
        return [nginx, "-c", str(self.conf), "-g", "daemon off;"]

    def test(self, nginx: str = "nginx") -> None:
        res = subprocess.run([nginx, "-t", "-q", "-c", str(self.conf)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RenderError(f"nginx -t failed in {self.path}:\n{res.stdout}{res.stderr}")


def relocate(value, prefix: Path):
    """PREFIX + value for a filesystem path, else None."""
    if isinstance(value, str) and value.startswith(FS_ROOTS) and "{{" not in value:
        return str(prefix) + value
    return None


def prepare_prefix(prefix: Path, workers: int | str | None = None, system: Path = SYSTEM_NGINX) -> Prefix:
    """Copy this machine's nginx configuration into PREFIX/etc/nginx and point its paths into PREFIX."""
    if not (system / "nginx.conf").exists():
        raise RenderError(f"{system}/nginx.conf is missing: install nginx (make bootstrap installs it)")
    prefix.mkdir(parents=True, exist_ok=True)
    etc = prefix / "etc" / "nginx"
    if etc.exists():
        shutil.rmtree(etc)
    shutil.copytree(system, etc, symlinks=False, ignore_dangling_symlinks=True)
    # As role nginx leaves a host: no default site; conf.d holds only what role gateway renders.
    for sub in ("sites-enabled", "conf.d"):
        shutil.rmtree(etc / sub, ignore_errors=True)
        (etc / sub).mkdir()
    for d in ("run", "var/log/nginx"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    for folder, _dirs, files in os.walk(etc):
        for name in files:
            path = Path(folder) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            new = text.replace(str(system) + "/", str(etc) + "/").replace("/var/log/nginx/", f"{prefix}/var/log/nginx/")
            if name == "nginx.conf" and Path(folder) == etc:
                lines = []
                for line in new.splitlines():
                    word = line.strip().split(" ", 1)[0]
                    if word == "pid":
                        line = f"pid {prefix}/run/nginx.pid;"
                    elif word == "worker_processes" and workers is not None:
                        line = f"worker_processes {workers};"
                    lines.append(line)
                new = "\n".join(lines) + "\n"
            if new != text:
                path.write_text(new, encoding="utf-8")
    # nginx's workers (user www-data) read files under the prefix.
    p = prefix
    while p != p.parent and not os.stat(p).st_mode & 0o001:
        os.chmod(p, os.stat(p).st_mode | 0o055)
        p = p.parent
    return Prefix(prefix)


def _files(tree: Path) -> dict[Path, float]:
    out = {}
    for folder, _dirs, files in os.walk(tree):
        for name in files:
            path = Path(folder) / name
            try:
                out[path] = path.stat().st_mtime
            except OSError:
                continue
    return out


def ansible_playbook() -> str:
    for cand in (os.environ.get("HERD_ANSIBLE_PLAYBOOK"), str(ROOT / ".venv" / "bin" / "ansible-playbook"),
                 shutil.which("ansible-playbook")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise RenderError("ansible-playbook not found: run make bootstrap (it builds .venv) or set HERD_ANSIBLE_PLAYBOOK")


def role_origin(roles: Path) -> str:
    role = roles / "gateway"
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", str(role)],
                             capture_output=True, text=True, timeout=30, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", str(role)],
                               capture_output=True, text=True, timeout=30, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev, dirty = "", ""
    if roles.resolve() != (ROOT / "roles").resolve():
        return f"role gateway from {roles}"
    return f"role gateway at {rev or 'uncommitted'}{' (with uncommitted changes)' if dirty else ''}"


def _filter_tasks(tasks, removed: list[str]):
    """Tasks without the SKIPPED_MODULES ones (recursing into blocks)."""
    out = []
    for task in tasks or []:
        if not isinstance(task, dict):
            out.append(task)
            continue
        if SKIPPED_MODULES & set(task):
            removed.append(task.get("name") or str(sorted(SKIPPED_MODULES & set(task))))
            continue
        for key in ("block", "rescue", "always"):
            if key in task:
                task = dict(task, **{key: _filter_tasks(task[key], removed)})
        out.append(task)
    return out


def copy_role(roles: Path, dest: Path) -> list[str]:
    """Copy role gateway to dest/gateway without the tasks that install packages or drive services."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(roles / "gateway", dest / "gateway")
    removed: list[str] = []
    for sub in ("tasks", "handlers"):
        for f in sorted((dest / "gateway" / sub).glob("*.y*ml")):
            text = f.read_text()
            fixed = FIXED_PATH.search(text)
            if fixed:
                raise RenderError(f"roles/gateway/{sub}/{f.name} names a fixed system path ({fixed.group(0).strip()}): "
                                  "the benchmark can only move paths that come from the role's vars or defaults")
            tasks = yaml.safe_load(text)
            if isinstance(tasks, list):
                f.write_text(yaml.safe_dump(_filter_tasks(tasks, removed), sort_keys=False, width=1000))
    return removed


def render_gateway(prefix: Path, plan: list[dict], port: int, overrides: dict | None = None,
                   workers: int | str | None = None, roles: Path | None = None, timeout: float = 300) -> Prefix:
    """Render role gateway for instances `plan` (one host's ollama_instances) listening on 127.0.0.1:`port`."""
    roles = Path(roles or ROOT / "roles")
    role = roles / "gateway"
    pre = prepare_prefix(prefix, workers)
    values = {}
    for part in ("defaults", "vars"):
        f = role / part / "main.yml"
        if f.exists():
            values.update(yaml.safe_load(f.read_text()) or {})
    extra: dict = {}
    dirs = {str(prefix / "run"), str(prefix / "var" / "log" / "nginx")}
    for key, value in values.items():
        moved = relocate(value, prefix)
        if moved is not None:
            extra[key] = moved
            dirs.add(os.path.dirname(moved))
            if key.endswith("_dir"):
                dirs.add(moved)
    extra.update({
        "herd_bench_prefix": str(prefix),
        "gateway_http_port": int(port),
    })
    for d in dirs:  # the folders the role expects its host to have (the role creates its own)
        Path(d).mkdir(parents=True, exist_ok=True)
    extra.update(overrides or {})
    work = prefix / "ansible"
    work.mkdir(exist_ok=True)
    inventory = {"all": {
        "hosts": {"bench": {"ansible_connection": "local", "ollama_instances": plan}},
        "children": {"ollama_hosts": {"hosts": {"bench": None}}, "gateways": {"hosts": {"bench": None}}},
    }}
    (work / "inventory.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    (work / "extra.json").write_text(json.dumps(extra, indent=1))
    removed = copy_role(roles, work / "roles")
    before = _files(prefix)
    playbook = ansible_playbook()
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_ROLES_PATH=str(work / "roles"),
               ANSIBLE_PYTHON_INTERPRETER=str(Path(playbook).parent / "python"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_PIPELINING="1")
    if not os.access(env["ANSIBLE_PYTHON_INTERPRETER"], os.X_OK):
        env.pop("ANSIBLE_PYTHON_INTERPRETER")
    argv = [playbook, "-i", str(work / "inventory.yml"), str(PLAYBOOK), "-e", f"@{work / 'extra.json'}"]
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RenderError(f"rendering the gateway took over {timeout:.0f} s: {' '.join(argv)}") from exc
    (work / "ansible.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RenderError(f"role gateway failed to render (rc {res.returncode}, {' '.join(argv)}):\n"
                          f"{(res.stdout + res.stderr)[-6000:]}")
    after = _files(prefix)
    pre.files = sorted(p for p, m in after.items()
                       if (p not in before or before[p] != m) and work not in p.parents
                       and not {prefix / "run", prefix / "var" / "log"} & set(p.parents))
    if not any(p.parent == prefix / "etc" / "nginx" / "conf.d" for p in pre.files):
        raise RenderError(f"role gateway rendered nothing into {prefix}/etc/nginx/conf.d: {pre.files}")
    pre.origin = role_origin(roles)
    pre.skipped_tasks = removed
    pre.render_seconds = time.monotonic() - t0
    pre.test()
    return pre


def write_conf(prefix: Path, name: str, text: str, workers: int | str | None = None) -> Prefix:
    """A prefix with this machine's nginx main config and one http-level config file `name` in conf.d."""
    pre = prepare_prefix(prefix, workers)
    target = pre.path / "etc" / "nginx" / "conf.d" / name
    target.write_text(text)
    pre.files = [target]
    pre.test()
    return pre
