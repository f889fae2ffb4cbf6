"""Helpers for the gateway role's unit tests: load the role's filter plugin and render its templates."""

import importlib.util
import os
import shutil
import subprocess

import jinja2
import pytest
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
ROLE = os.path.join(ROOT, "roles", "gateway")


def _load_filters():
    path = os.path.join(ROLE, "filter_plugins", "gateway.py")
    spec = importlib.util.spec_from_file_location("herd_gateway_filters", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gw():
    return _load_filters()


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
    values = dict(role_defaults())
    values.update(role_vars())
    values["ansible_managed"] = "Managed by herd (test)"
    values.update(overrides)
    return env.get_template(template).render(**values)


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def nginx_test(tmp_path, conf_text, extra_files=None):
    """Run nginx -t on a minimal main config that includes conf_text in its http block."""
    if NGINX is None:
        pytest.skip("nginx is not installed here")
    for rel, text in (extra_files or {}).items():
        path = tmp_path / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    conf = tmp_path / "herd-gateway.conf"
    # Absolute paths of the role point into tmp_path so the test touches nothing outside it.
    for rel in (extra_files or {}):
        conf_text = conf_text.replace(rel, str(tmp_path / rel.lstrip("/")))
    conf_text = conf_text.replace("/var/log/nginx/", str(tmp_path) + "/")
    conf.write_text(conf_text)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  include {conf};\n}}\n"
    )
    return subprocess.run(
        [NGINX, "-t", "-q", "-p", str(tmp_path), "-c", str(main)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
