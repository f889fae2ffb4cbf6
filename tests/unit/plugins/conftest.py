"""Load herd's plugins by path (they are not in an installed collection) and read captured nvidia-smi output."""

from __future__ import annotations

import pathlib

import pytest
from herd_testing import load_module

REPO = pathlib.Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "unit" / "fixtures" / "nvidia-smi"


load_plugin = load_module


def fixture_text(name):
    return (FIXTURES / name).read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpu_info():
    return load_plugin("plugins/modules/nvidia_gpu_info.py", "herd_nvidia_gpu_info")


@pytest.fixture(scope="session")
def planner():
    return load_plugin("plugins/filter/ollama_plan.py", "herd_ollama_plan")


@pytest.fixture(scope="session")
def read_fixture():
    return fixture_text


@pytest.fixture(scope="session")
def gpus_from(gpu_info):
    """Parse a captured query output (and optional `nvidia-smi -L` output) the way the module does."""

    def parse(csv_name, mig_list_name=None):
        gpus = gpu_info.parse_query_output(fixture_text(csv_name))
        if mig_list_name:
            gpu_info.attach_mig_devices(gpus, gpu_info.parse_mig_list(fixture_text(mig_list_name)))
        return gpus

    return parse
