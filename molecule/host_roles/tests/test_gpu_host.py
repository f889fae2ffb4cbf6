"""State of a GPU host after the docker, nvidia_container_toolkit and nginx roles."""

import json

# By group, so that the trixie scenario (molecule/trixie_host_roles) runs these tests on its own hosts.
testinfra_hosts = ["ansible://h3_gpu_hosts"]


def daemon_json(host):
    return json.loads(host.file("/etc/docker/daemon.json").content_string)


# ---- docker -------------------------------------------------------------------------------------------------


def test_docker_service_enabled_and_running(host):
    docker = host.service("docker")
    assert docker.is_enabled
    assert docker.is_running


def test_docker_engine_answers(host):
    out = host.run("docker version --format '{{.Server.Version}}'")
    assert out.rc == 0, out.stderr
    assert out.stdout.strip()[:2].isdigit(), out.stdout


def test_daemon_json_keeps_unrelated_keys_and_merges_herd_options(host):
    data = daemon_json(host)
    # Seeded by prepare.yml, never named by the scenario: must survive.
    assert data["debug"] is False
    assert data["log-opts"]["max-size"] == "10m"
    # Set by docker_daemon_options, merged recursively into the seeded log-opts.
    assert data["log-opts"]["max-file"] == "5"
    assert data["storage-driver"] == "vfs"


def test_engine_runs_with_the_merged_settings(host):
    out = host.run("docker info --format '{{.Driver}}'")
    assert out.rc == 0, out.stderr
    assert out.stdout.strip() == "vfs"


# ---- nvidia_container_toolkit ------------------------------------------------------------------------------


def test_daemon_json_has_the_nvidia_runtime(host):
    runtime = daemon_json(host)["runtimes"]["nvidia"]
    assert runtime == {"args": [], "path": "nvidia-container-runtime"}
    assert "default-runtime" not in daemon_json(host)


def test_engine_was_restarted_with_the_nvidia_runtime(host):
    out = host.run("docker info --format '{{json .Runtimes}}'")
    assert out.rc == 0, out.stderr
    assert json.loads(out.stdout)["nvidia"]["path"] == "nvidia-container-runtime"


def test_toolkit_repository_is_signed_and_configured(host):
    source = host.file("/etc/apt/sources.list.d/nvidia-container-toolkit.list")
    assert source.content_string == (
        "deb [signed-by=/etc/apt/keyrings/nvidia-container-toolkit.asc] http://127.0.0.1:8089 /\n"
    )
    key = host.file("/etc/apt/keyrings/nvidia-container-toolkit.asc")
    assert key.mode == 0o644
    assert key.content_string.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    # apt verified InRelease against that key: the repository's packages are known to apt.
    policy = host.run("apt-cache policy nvidia-container-toolkit")
    assert "http://127.0.0.1:8089" in policy.stdout
    assert "1.17.8-1" in policy.stdout  # a newer version is available ...


def test_toolkit_is_installed_at_the_pinned_version(host):
    pkg = host.package("nvidia-container-toolkit")
    assert pkg.is_installed
    assert pkg.version == "1.17.7-1"  # ... and the pin won.
    assert host.run("nvidia-ctk --version").stdout.startswith("NVIDIA Container Toolkit CLI version 1.17.7-1")


# ---- nginx --------------------------------------------------------------------------------------------------


def test_nginx_enabled_and_running(host):
    nginx = host.service("nginx")
    assert nginx.is_enabled
    assert nginx.is_running


def test_nginx_default_site_removed(host):
    assert not host.file("/etc/nginx/sites-enabled/default").exists
    assert not host.socket("tcp://0.0.0.0:80").is_listening


def test_nginx_configuration_is_valid(host):
    out = host.run("nginx -t")
    assert out.rc == 0, out.stderr


def test_nginx_optional_module_is_loaded(host):
    assert host.package("libnginx-mod-http-js").is_installed
    out = host.run("nginx -T")
    assert out.rc == 0, out.stderr
    assert "ngx_http_js_module.so" in out.stdout


def test_nginx_change_was_reloaded_not_restarted(host):
    before = host.file("/var/lib/herd-molecule/nginx-master-pid-before-probe").content_string.strip()
    now = host.file("/run/nginx.pid").content_string.strip()
    assert before == now, "nginx master PID changed: it was restarted instead of reloaded"
    out = host.run("curl -fsS http://127.0.0.1:8081/")
    assert out.rc == 0, out.stderr
    assert out.stdout == "herd nginx probe\n"
