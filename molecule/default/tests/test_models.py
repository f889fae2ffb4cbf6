"""Several models per instance (issue 21) and today's Ollama environment (issue 19) on the all-in-one host."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_checks import env_file  # noqa: E402

GPUS = 4
BASE_PORT = 11434


def test_instances_keep_both_models_and_get_todays_environment(host):
    for i in range(GPUS):
        env = env_file(host, i)
        assert env["OLLAMA_MAX_LOADED_MODELS"] == "2"  # derived from the two models every instance holds
        assert env["OLLAMA_CONTEXT_LENGTH"] == "8192"  # herd's default, not Ollama's GPU-memory-based one
        assert env["OLLAMA_NOPRUNE"] == "1"  # per-instance copies come from ollama_model_sync
        assert "OLLAMA_NO_CLOUD" not in env  # an option, off by default
        log = host.run(f"journalctl -u ollama@{i} --no-pager -o cat").stdout
        assert "OLLAMA_MAX_LOADED_MODELS=2" in log and "OLLAMA_CONTEXT_LENGTH=8192" in log
        assert "OLLAMA_NOPRUNE=True" in log and "total unused blobs removed" not in log


def test_release_archive_is_the_zstd_one_and_version_current(host):
    assert host.file("/opt/ollama/ollama-linux-amd64-0.34.2-herd-emulator.tar.zst").exists
    assert host.package("zstd").is_installed
    version = json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{BASE_PORT}/api/version"))["version"]
    assert version == "0.34.2-herd-emulator"


def test_stock_ollama_service_was_stopped_and_disabled(host):
    """prepare left an enabled, running ollama.service on 11434; ollama_stock_service: disable stopped it."""
    stock = host.service("ollama.service")
    assert not stock.is_running and not stock.is_enabled
    # port 11434 is herd's instance 0 now: an Ollama API, not the stand-in's directory listing
    assert json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{BASE_PORT}/api/tags"))["models"]
    assert "CUDA_VISIBLE_DEVICES" in host.run("cat /proc/$(systemctl show -p MainPID --value ollama@0)/environ").stdout
