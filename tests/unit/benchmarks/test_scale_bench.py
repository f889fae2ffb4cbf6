"""The scale benchmark cannot rot: its short mode runs here (make unit): herd's gateway rendered by role gateway's
own tasks in front of 4 and then 16 emulated instances served by one emulator process (HERD_EMU_EXTRA_PORTS), with
the real nginx, herd-exporter and herd-guard code."""

import json
import os
import shutil

from conftest import run_short_mode


def test_short_mode_measures_every_size(tmp_path):
    assert shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"), "nginx is missing: run make bootstrap"
    out = run_short_mode("scale_bench.py", tmp_path, 420)
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
