"""Helpers for the gateway role's unit tests: load the role's filter plugin and render its templates."""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import jinja2
import pytest
import yaml
from herd_testing import load_module
from ollama_process import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ROLE = os.path.join(ROOT, "roles", "gateway")


@pytest.fixture(scope="session")
def gw():
    return load_module("roles/gateway/filter_plugins/gateway.py", "herd_gateway_filters")


def role_defaults():
    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def role_vars():
    with open(os.path.join(ROLE, "vars", "main.yml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def render(template, **overrides):
    """Render a role template with the role's defaults and vars plus overrides (no Ansible needed)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(os.path.join(ROLE, "templates")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
    )
    env.filters["comment"] = lambda text: f"#\n# {text}\n#"
    env.filters["bool"] = lambda value: value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
    values = dict(role_defaults())
    values.update(role_vars())
    values["ansible_managed"] = "Managed by herd (test)"
    values.update(overrides)
    # The role's derived vars (a string with an expression, like _gateway_affinity_mode) evaluated as Ansible would
    # when the template reads them; those that need facts or other roles' vars stay as they are.
    for name, value in list(values.items()):
        if name.startswith("_") and isinstance(value, str) and "{{" in value and name not in overrides:
            try:
                values[name] = env.from_string(value).render(**values).strip()
            except jinja2.exceptions.UndefinedError:
                pass
    return env.get_template(template).render(**values)


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
MODULES = "/usr/lib/nginx/modules"
LUA_DIR = os.path.join(ROLE, "files")


def _lua_modules_present():
    return all(os.path.exists(os.path.join(MODULES, m)) for m in ("ndk_http_module.so", "ngx_http_lua_module.so"))


def main_config(tmp_path, http_text):
    """A minimal nginx.conf loading the Lua modules (as Debian's modules-enabled does) around http_text."""
    if NGINX is None or not _lua_modules_present():
        pytest.skip("nginx with libnginx-mod-http-lua is not installed here (scripts/bootstrap.sh installs it)")
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"load_module {MODULES}/ndk_http_module.so;\nload_module {MODULES}/ngx_http_lua_module.so;\n"
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n{http_text}\n}}\n"
    )
    return main



def run_lua(tmp_path, code, dicts=("herd_gateway", "herd_queue")):
    """Run Lua `code` (it answers with ngx.say) once inside a real nginx with the role's Lua modules on its path and
    the shared dicts `dicts` (1m each); returns the decoded JSON answer."""
    port = free_port()
    # ENDPOINTS: the role's endpoint table (_gateway_endpoints), as init_by_lua gets it, for the code's build().
    endpoints = json.dumps(role_vars()["_gateway_endpoints"])
    (tmp_path / "test.lua").write_text(f'local ENDPOINTS = require("cjson.safe").decode([==[{endpoints}]==])\n' + code)
    zones = "".join(f"\n  lua_shared_dict {name} 1m;" for name in dicts)
    main = main_config(tmp_path, f"""
  lua_package_path "{LUA_DIR}/?.lua;;";{zones}
  server {{
    listen 127.0.0.1:{port};
    location = /t {{ content_by_lua_file {tmp_path}/test.lua; }}
  }}""")
    (tmp_path / "logs").mkdir()
    with open(main, "a", encoding="utf-8") as handle:
        handle.write("daemon off;\nmaster_process off;\n")
    proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(main)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/t", timeout=5) as resp:
                    return json.loads(resp.read())
            except (urllib.error.URLError, ConnectionError) as exc:
                if time.monotonic() > deadline or proc.poll() is not None:
                    log = (tmp_path / "error.log").read_text()
                    raise AssertionError(f"nginx test server failed: {exc}; {log}") from exc
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_nginx_t(tmp_path, main):
    return subprocess.run(
        [NGINX, "-t", "-q", "-p", str(tmp_path), "-c", str(main)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )


def gateway_config(tmp_path, conf_text, extra_files=None, servers=None, drained=None):
    """Write a rendered gateway config and the files it reads under tmp_path; returns the main nginx.conf.

    The role's absolute paths point into tmp_path; the Lua module is the role's own file; `servers` is the
    servers.json record the gateway's init_by_lua reads (default: two loopback instances).
    """
    files = dict(extra_files or {})
    record = servers if servers is not None else {"upstream": {}, "servers": [
        {"key": "h:0", "host": "h", "address": "127.0.0.1", "port": 11434, "endpoint": "127.0.0.1:11434",
         "max_conns": 1, "weight": 1, "backup": False, "models": ["a:1"]},
        {"key": "h:1", "host": "h", "address": "127.0.0.1", "port": 11435, "endpoint": "127.0.0.1:11435",
         "max_conns": 2, "weight": 2, "backup": False, "models": ["a:1", "b:latest"]},
    ]}
    files["/var/lib/herd/gateway/servers.json"] = json.dumps(record)
    if drained is not None:
        files["/var/lib/herd/gateway/drained.json"] = json.dumps(drained)
    for rel, text in files.items():
        path = tmp_path / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    conf = tmp_path / "herd-gateway.conf"
    # Absolute paths of the role point into tmp_path so the test touches nothing outside it.
    for rel in files:
        if not rel.startswith("/var/lib/herd/gateway/"):  # the state directory moves as a whole, below
            conf_text = conf_text.replace(rel, str(tmp_path / rel.lstrip("/")))
    conf_text = conf_text.replace("/var/log/nginx/", str(tmp_path) + "/")
    conf_text = conf_text.replace("/var/lib/herd/gateway/", str(tmp_path / "var/lib/herd/gateway") + "/")
    conf_text = conf_text.replace("/usr/local/share/herd/lua", LUA_DIR)
    conf.write_text(conf_text)
    return main_config(tmp_path, f"  include {conf};")


def nginx_test(tmp_path, conf_text, extra_files=None, servers=None, drained=None):
    """Run the real nginx -t (Lua modules loaded) on a minimal main config that includes conf_text (the files
    as gateway_config writes them)."""
    return run_nginx_t(tmp_path, gateway_config(tmp_path, conf_text, extra_files, servers, drained))


class Gateway:
    """The real nginx serving a rendered gateway config (gateway_config's files) on `port`, in the foreground
    (a master and one worker) until stop()."""

    def __init__(self, tmp_path, port, conf_text, extra_files=None, servers=None):
        main = gateway_config(tmp_path, conf_text, extra_files, servers)
        (tmp_path / "logs").mkdir(exist_ok=True)
        self.port = port
        self.error_log = tmp_path / "error.log"
        self.proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(main), "-g", "daemon off;"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/herd/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError) as exc:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    out = self.proc.stdout.read().decode(errors="replace")
                    log = self.error_log.read_text() if self.error_log.exists() else ""
                    raise AssertionError(f"the gateway did not start: {exc}; {out}{log}") from exc
                time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


UPSTREAM = {"name": "herd_ollama", "zone_size": "256k", "keepalive": 8, "drain": []}


def gateway_over(tmp_path, gw, instances, **overrides):
    """The real nginx serving the role's gateway rendered (role defaults and vars, then `overrides`) in front of
    `instances`: (port, num_parallel, models) of each, on loopback, as one host's plan; gateway_queue_per_instance
    0 (max_conns = num_parallel). Returns the started Gateway (its `port`)."""
    plan = {"h": {"ollama_instances": [
        {"id": n, "port": port, "num_parallel": parallel, "local_url": f"http://127.0.0.1:{port}",
         "endpoint": f"127.0.0.1:{port}", "models": models} for n, (port, parallel, models) in enumerate(instances)]}}
    servers = gw.gateway_servers(["h"], plan, "h", queue_per_instance=0)
    values = {"_gateway_upstream": UPSTREAM, "_gateway_keys": [], "gateway_http_port": free_port(), **overrides}
    files = {"/etc/nginx/herd/gateway-upstream.conf": render("etc/nginx/herd/gateway-upstream.conf.j2",
                                                             _gateway_servers=servers, _gateway_upstream=UPSTREAM)}
    if values["_gateway_keys"]:
        files["/etc/nginx/herd/gateway-keys.json"] = render("etc/nginx/herd/gateway-keys.json.j2",
                                                            _gateway_keys=values["_gateway_keys"])
    return Gateway(tmp_path, values["gateway_http_port"], render("etc/nginx/conf.d/herd-gateway.conf.j2", **values),
                   files, servers={"upstream": UPSTREAM, "servers": servers})


_lab = load_module("tests/unit/standins/standins_lab.py", "herd_standins_lab_gateway")


def emulated_stack(tmp, gw, models, gpus=(0,), parallel=1, tokens_per_second=100, env=None, **overrides):
    """A context manager: herd emulator instances (the lab stand-in for Ollama's inference), one per GPU in `gpus`,
    each with `parallel` slots, holding `models` (one store) and `env` added to its environment, behind the real
    nginx serving the role's gateway rendered with `overrides`. Yields (gateway, emulators); stops both however
    the block ends."""
    import contextlib

    @contextlib.contextmanager
    def stack():
        if NGINX is None:
            pytest.skip("nginx is not installed here")
        store = tmp / "models"
        _lab.mkmodels.write_models(str(store), list(models))
        emus = []
        try:
            for gpu in gpus:
                emus.append(_lab.Emu(tmp, {
                    "OLLAMA_MODELS": str(store), "HERD_LAB_GPU_SPEC": str(_lab.GPUS / "l20x4.json"),
                    "CUDA_VISIBLE_DEVICES": str(gpu), "OLLAMA_NUM_PARALLEL": str(parallel),
                    "OLLAMA_MAX_LOADED_MODELS": "2", "HERD_EMU_LOAD_SECONDS": "0.05",
                    "HERD_EMU_TOKENS_PER_SECOND": str(tokens_per_second), **(env or {})}))
            gateway = gateway_over(tmp, gw, [(e.port, parallel, list(models)) for e in emus], **overrides)
            try:
                yield gateway, emus
            finally:
                gateway.stop()
        finally:
            for emu in emus:
                emu.stop()

    return stack()
