"""Shared by the benchmarks' short-mode tests: run a benchmark script in its short mode."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def run_short_mode(script, tmp_path, timeout):
    """benchmarks/<script> --short, its report under tmp_path/report and scratch under tmp_path/w; fails the test
    when it runs over `timeout` seconds (the benchmark stops its nginx and emulators on SIGTERM) or exits non-zero.
    Returns the report folder."""
    out = tmp_path / "report"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / script), "--short", "--out", str(out), "--work", str(tmp_path / "w"),
         "--command", "pytest tests/unit/benchmarks"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        _stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the short mode ran over {timeout} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return out
