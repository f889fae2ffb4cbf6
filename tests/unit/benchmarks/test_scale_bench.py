"""The scale benchmark cannot rot: its short mode runs here (make unit): herd's gateway rendered by role gateway's
own tasks in front of 4 and then 16 emulated instances served by one emulator process (HERD_EMU_EXTRA_PORTS), with
the real nginx, herd-exporter and herd-guard code."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_short_mode_measures_every_size(tmp_path):
    assert shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"), "nginx is missing: run make bootstrap"
    out = tmp_path / "report"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "scale_bench.py"), "--short", "--out", str(out),
         "--work", str(tmp_path / "w"), "--command", "pytest tests/unit/benchmarks"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark stops its nginx and emulators on SIGTERM
        _stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the short mode ran over 420 s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    (js,) = out.glob("*-scale.json")
    (md,) = out.glob("*-scale.md")
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert [r["instances"] for r in rows] == [4, 16]
    for r in rows:
        # every request served through the gateway; every instance judged by herd-guard, none drained
        assert r["ok"] == r["requests"] == 40, r
        assert r["guard_judged"] == r["instances"], r
        assert r["tags_burst_errors"] == 0 and r["tags_burst_requests"] > 20, r
        # one fan-out per catalogue lifetime: the burst spans a few lifetimes, never one fan-out per request
        assert r["tags_fanouts"] <= r["tags_intervals"] + 1, r
        assert r["pools_bytes"] > 0 and r["reload_s"] > 0 and r["nginx_pss_mib"] > 0, r
    # /herd/pools lists every instance: it grows with the size
    assert rows[1]["pools_bytes"] > rows[0]["pools_bytes"]
    text = md.read_text()
    assert "| 16 | 40/40 |" in text and "(issue 32)" in text and "pytest tests/unit/benchmarks" in text
    assert {g["goal"][:40] for g in data["goals"]} and len(data["goals"]) == 5
