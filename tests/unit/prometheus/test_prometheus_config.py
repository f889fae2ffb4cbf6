"""Role prometheus: the rendered prometheus.yml scrapes every herd-exporter, labelled by inventory name.

The templates are rendered with Ansible's own templar (the filters and `default` semantics of ansible-core), then
parsed as YAML; promtool checks the result where it is installed.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar, trust_as_template

ROLE = pathlib.Path(__file__).resolve().parents[3] / "roles" / "prometheus"
MANAGED = "Ansible managed: herd"


def load(relative):
    return yaml.safe_load((ROLE / relative).read_text(encoding="utf-8"))


def render(text, variables):
    templar = Templar(loader=DataLoader(), variables=variables)
    return templar.template(trust_as_template(text))


def render_file(relative, variables):
    return render((ROLE / "templates" / relative).read_text(encoding="utf-8"), variables)


def base_vars(**extra):
    variables = {
        "ansible_managed": MANAGED,
        "prometheus_scrape_interval": "15s",
        "prometheus_scrape_timeout": "10s",
        "prometheus_job_name": "herd",
        "prometheus_exporter_port": 9855,
        "prometheus_guard_port": 0,
        "prometheus_listen_address": "127.0.0.1:9090",
        "prometheus_retention": "15d",
        "prometheus_extra_args": [],
    }
    variables.update(extra)
    return variables


# gpu1 advertises an address of its own, gpu2 has only ansible_host and its own exporter port, gw1 only its name.
THREE_HOSTS = {
    "gpu1": {"ansible_host": "192.0.2.1", "ollama_advertise_address": "10.0.0.11"},
    "gpu2": {"ansible_host": "10.0.0.12", "exporter_port": 9900},
    "gw1": {},
}


def scrape_config(hosts, hostvars):
    text = render_file("etc/prometheus/prometheus.yml.j2", base_vars(prometheus_scrape_hosts=hosts, hostvars=hostvars))
    return text, yaml.safe_load(text)


def targets_by_host(config, job_name="herd"):
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == job_name]
    found = {}
    for group in job["static_configs"]:
        assert set(group) == {"targets", "labels"}
        (target,) = group["targets"]
        found[group["labels"]["host"]] = target
    return found


def test_three_hosts_render_one_labelled_target_each():
    text, config = scrape_config(["gpu1", "gpu2", "gw1"], THREE_HOSTS)
    assert text.startswith("#"), "first line must be the ansible_managed comment"
    assert f"# {MANAGED}" in text.splitlines()[:3]
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["scrape_timeout"] == "10s"
    (job,) = config["scrape_configs"]  # no guard job: prometheus_guard_port is 0 in base_vars
    assert job["job_name"] == "herd"
    # the exporter's own `host` label must not be renamed exported_host
    assert job["honor_labels"] is True
    assert targets_by_host(config) == {
        "gpu1": "10.0.0.11:9855",
        "gpu2": "10.0.0.12:9900",
        "gw1": "gw1:9855",
    }


def test_ipv6_address_is_bracketed():
    _, config = scrape_config(["gpu6"], {"gpu6": {"ollama_advertise_address": "2001:db8::6"}})
    assert targets_by_host(config) == {"gpu6": "[2001:db8::6]:9855"}


def test_guard_job_scrapes_each_guard_that_listens_beyond_loopback():
    hostvars = {**THREE_HOSTS, "gw1": {"guard_listen_address": "127.0.0.1"}, "gpu2": {**THREE_HOSTS["gpu2"], "guard_port": 9901}}
    text = render_file("etc/prometheus/prometheus.yml.j2",
                       base_vars(prometheus_scrape_hosts=["gpu1", "gpu2", "gw1"], hostvars=hostvars, prometheus_guard_port=9856))
    config = yaml.safe_load(text)
    assert [j["job_name"] for j in config["scrape_configs"]] == ["herd", "herd-guard"]
    assert targets_by_host(config, "herd-guard") == {"gpu1": "10.0.0.11:9856", "gpu2": "10.0.0.12:9901"}
    assert targets_by_host(config)["gw1"] == "gw1:9855"


def test_default_guard_port_follows_guard_port():
    expression = load("defaults/main.yml")["prometheus_guard_port"]
    assert int(render(expression, {})) == 9856
    assert int(render(expression, {"guard_port": 9911})) == 9911


def test_default_scrape_hosts_are_both_groups_once_each():
    expression = load("defaults/main.yml")["prometheus_scrape_hosts"]
    groups = {"ollama_hosts": ["gpu1", "gpu2", "aio"], "gateways": ["aio", "gw1"], "all": []}
    assert render(expression, {"groups": groups}) == ["gpu1", "gpu2", "aio", "gw1"]
    assert render(expression, {"groups": {"all": []}}) == []


def test_default_exporter_port_follows_exporter_port():
    expression = load("defaults/main.yml")["prometheus_exporter_port"]
    assert int(render(expression, {})) == 9855
    assert int(render(expression, {"exporter_port": 9911})) == 9911


def test_default_file_carries_listen_address_retention_and_extra_flags():
    text = render_file(
        "etc/default/prometheus.j2",
        base_vars(
            prometheus_listen_address="0.0.0.0:9091",
            prometheus_retention="30d",
            prometheus_extra_args=["--web.enable-lifecycle"],
        ),
    )
    assert text.splitlines()[0].startswith("#")
    (args,) = [line for line in text.splitlines() if line.startswith("ARGS=")]
    assert args == 'ARGS="--web.listen-address=0.0.0.0:9091 --storage.tsdb.retention.time=30d --web.enable-lifecycle"'


@pytest.mark.parametrize(
    ("value", "ok"),
    [("15s", True), ("1m30s", True), ("15d", True), ("500ms", True), ("15", False), ("15 s", False), ("", False)],
)
def test_duration_pattern(value, ok):
    assert bool(re.match(load("vars/main.yml")["_prometheus_duration"], value)) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("127.0.0.1:9090", True),
        (":9090", True),
        ("[::1]:9090", True),
        ("mon1:9090", True),
        ("9090", False),
        ("::1:9090", False),
        ("127.0.0.1:", False),
    ],
)
def test_listen_address_pattern(value, ok):
    assert bool(re.match(load("vars/main.yml")["_prometheus_listen_pattern"], value)) is ok


def test_promtool_accepts_the_rendered_config(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed here (Debian package prometheus, 96 MB installed); "
            "the role itself validates with promtool on the monitoring host"
        )
    text, _ = scrape_config(["gpu1", "gpu2", "gw1"], THREE_HOSTS)
    path = tmp_path / "prometheus.yml"
    path.write_text(text, encoding="utf-8")
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
