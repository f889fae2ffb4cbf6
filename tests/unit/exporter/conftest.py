"""Load the exporter (roles/exporter/files/herd_exporter.py) and the strict exposition checker."""

import os
import sys

import pytest
from herd_testing import load_module

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
FIXTURES = os.path.join(HERE, "fixtures")
sys.path.insert(0, HERE)


@pytest.fixture(scope="session")
def ex():
    return load_module("roles/exporter/files/herd_exporter.py", "herd_exporter")


def fixture_text(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as handle:
        return handle.read()
