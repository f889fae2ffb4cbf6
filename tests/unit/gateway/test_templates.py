"""Render the gateway templates with sample servers and check them with the real nginx when it is installed."""

import json
import os
import re

import yaml
from conftest import ROLE, nginx_test, render, role_defaults

SERVERS = [
    {"key": "gpu1:0", "name": "ollama-0", "endpoint": "10.0.0.11:11434", "num_parallel": 4, "max_conns": 6,
     "max_fails": 1, "fail_timeout": "10s", "weight": 4, "backup": False, "down": False, "models": ["a:1"]},
    {"key": "gpu1:1", "name": "ollama-1", "endpoint": "10.0.0.11:11435", "num_parallel": 2, "max_conns": 4,
     "max_fails": 1, "fail_timeout": "10s", "weight": 2, "backup": True, "down": True, "models": []},
]
CONF = "etc/nginx/conf.d/herd-gateway.conf.j2"
UPSTREAM = "etc/nginx/herd/gateway-upstream.conf.j2"
UP = {"name": "herd_ollama", "zone_size": "256k", "keepalive": 32, "drain": []}
KEYS = [{"name": "team-a", "key": "A" * 32, "digest": "0" * 40}]


def server_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip().startswith("server 10.")]


def upstream_file():
    return {"/etc/nginx/herd/gateway-upstream.conf": render(UPSTREAM, _gateway_servers=SERVERS, _gateway_upstream=UP)}


def test_default_render_is_valid_nginx(tmp_path):
    text = render(CONF, _gateway_upstream=UP, _gateway_keys=[])
    upstream = upstream_file()["/etc/nginx/herd/gateway-upstream.conf"]
    assert text.startswith("#\n# Managed by herd") and upstream.startswith("#\n# Managed by herd")
    assert "include /etc/nginx/herd/gateway-upstream.conf;" in text
    # The peers are the Lua balancer's; the servers are listed as comments for people reading the file.
    assert "# gpu1:0 10.0.0.11:11434 (ollama-0, num_parallel 4, max_conns 6, models a:1)" in upstream
    assert server_lines(upstream) == []
    balancer = upstream.index("balancer_by_lua_block")
    assert "server 0.0.0.1:1;" in upstream and upstream.index("keepalive 32;") > balancer
    for directive in ("proxy_pass http://herd_ollama;", "proxy_buffering off;",
                      'proxy_set_header Connection "";', "proxy_http_version 1.1;", "proxy_read_timeout 600s;",
                      "error_page 502 = @herd_unavailable;",
                      'error_answer(502, "the herd instance failed to answer; please try again", 2)',
                      "proxy_next_upstream error timeout non_idempotent;", "proxy_next_upstream_tries 3;",
                      "lua_shared_dict herd_gateway 1m;", "client_body_buffer_size 16m;", "client_max_body_size 16m;",
                      "lua_check_client_abort on;", 'require("herd_gateway").access("route")',
                      'require("herd_gateway").log()', 'require("herd_gateway").header_filter()',
                      "location = /herd/pools {",
                      "location ~ ^/(api/tags|api/ps|v1/models)$ {", '"pool":"$herd_pool"'):
        assert directive in text, directive
    # The settings reach the Lua module as JSON.
    settings = json.loads(text.split("init([==[")[1].split("]==], {")[0])
    assert settings["queue_max"] == 64 and settings["queue_timeout"] == "120s"
    assert settings["client_keep_alive"] == "ignore" and settings["model_options"] == {}
    assert settings["servers_file"] == "/var/lib/herd/gateway/servers.json"
    assert settings["drained_file"] == "/var/lib/herd/gateway/drained.json"
    assert "include /etc/nginx/herd/gateway-keys.conf" not in text
    assert "limit_req" not in text
    assert "listen 80 default_server;" in text and "ssl" not in text
    result = nginx_test(tmp_path, text, upstream_file())
    assert result.returncode == 0, result.stdout


def test_everything_on_renders_valid_nginx(tmp_path):
    keys = render("etc/nginx/herd/gateway-keys.json.j2", _gateway_keys=KEYS)
    # Only names and digests: the keys themselves are not in the file.
    assert json.loads(keys)["keys"] == [["0" * 40, "team-a", {}]] and "A" * 32 not in keys
    text = render(
        CONF, _gateway_upstream=UP, _gateway_keys=KEYS, gateway_rate_limit=5, gateway_busy_status=429,
        gateway_tls_enabled=True, gateway_real_ip_from=["10.9.0.0/16"], gateway_block_model_management=False,
        gateway_allow=["10.0.0.0/8", "fd00::/8"],
    )
    assert 'error_answer(429, "rate limit exceeded, please slow down", 1)' in text
    assert "limit_req zone=herd_gateway_rate burst=20 nodelay;" in text and "return 401" not in text
    assert "listen 443 ssl default_server;" in text and "set_real_ip_from 10.9.0.0/16;" in text
    assert "    fd00::/8 1;" in text
    # Model management is proxied without non_idempotent: a failed pull is never replayed elsewhere.
    mgmt = text.split("location ~ ^/api/(pull")[1].split("location / {")[0]
    assert "proxy_next_upstream error timeout;" in mgmt and 'access("any")' in mgmt
    tls = tmp_path / "etc/nginx/herd/tls"
    tls.mkdir(parents=True)
    os.system(f"openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=t -keyout {tls}/gateway.key -out {tls}/gateway.crt"
              " >/dev/null 2>&1")
    text = text.replace("/etc/nginx/herd/tls/", str(tls) + "/")
    assert "if ($herd_plain_http_refused)" in text and '~^http: 1;' in text and "set_by_lua_block $herd_key_name" in text
    assert "limit_conn herd_gateway_conn 64;" in text and "$herd_upstream_shown" in text
    result = nginx_test(tmp_path, text, {"/etc/nginx/herd/gateway-keys.json": keys, **upstream_file()})
    assert result.returncode == 0, result.stdout


def test_bad_extra_config_fails_nginx(tmp_path):
    text = render(CONF, _gateway_upstream=UP, _gateway_keys=[], gateway_extra_config=["bogus_directive on;"])
    result = nginx_test(tmp_path, text, upstream_file())
    assert result.returncode != 0 and 'unknown directive "bogus_directive"' in result.stdout


def test_argument_specs_match_defaults():
    with open(os.path.join(ROLE, "meta", "argument_specs.yml"), encoding="utf-8") as handle:
        specs = yaml.safe_load(handle)["argument_specs"]
    defaults = role_defaults()
    assert set(specs["main"]["options"]) == set(defaults)
    for entry in ("drain", "undrain"):
        assert set(specs[entry]["options"]) <= set(defaults)
    for name, option in specs["main"]["options"].items():
        assert option.get("description"), name
        assert "{{" not in option["description"], name  # descriptions are templated by validate_argument_spec


def test_every_knob_is_commented_in_defaults():
    with open(os.path.join(ROLE, "defaults", "main.yml"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for index, line in enumerate(lines):
        if re.match(r"^gateway_\w+:", line):
            assert lines[index - 1].startswith("# "), line
