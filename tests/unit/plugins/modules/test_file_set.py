"""plugins/modules/file_set.py, run as Ansible runs a module (its file and a JSON of arguments) on real folders:
one run writes the set, a second changes nothing, a change writes only what differs, a link planted where a
file or folder of the set belongs is replaced and its target left untouched, prune removes only its suffix."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]
MODULE = ROOT / "plugins" / "modules" / "file_set.py"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the module sets owner root (make test runs as root)")

FILES = {"main.lua": "return 1\n", "pkg/a.lua": "-- a\n", "pkg/b.lua": "-- b é\n"}


def run(tmp_path, check=False, diff=False, **args):
    argfile = tmp_path / "args.json"
    args = {"_ansible_check_mode": check, "_ansible_diff": diff, **args}
    argfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    proc = subprocess.run([sys.executable, str(MODULE), str(argfile)], capture_output=True, text=True, timeout=60)
    out = json.loads(proc.stdout)
    return out


def tree(dest):
    return {str(p.relative_to(dest)): (p.read_text(), oct(p.stat().st_mode & 0o777))
            for p in sorted(dest.rglob("*")) if p.is_file()}


def test_one_run_writes_the_set_and_a_second_changes_nothing(tmp_path):
    dest = tmp_path / "lua"
    first = run(tmp_path, dest=str(dest), files=FILES)
    assert first["changed"] is True and first["written"] == sorted(FILES), first
    assert tree(dest) == {k: (v, "0o644") for k, v in FILES.items()}
    assert oct((dest / "pkg").stat().st_mode & 0o777) == "0o755"
    second = run(tmp_path, dest=str(dest), files=FILES)
    assert second["changed"] is False and second["written"] == [] and second["removed"] == [], second


def test_only_what_differs_is_written(tmp_path):
    dest = tmp_path / "lua"
    run(tmp_path, dest=str(dest), files=FILES)
    (dest / "pkg" / "a.lua").write_text("-- edited on the host\n")
    (dest / "main.lua").chmod(0o600)
    out = run(tmp_path, dest=str(dest), files=FILES, diff=True)
    assert out["changed"] is True and out["written"] == ["main.lua", "pkg/a.lua"], out
    assert "pkg/a.lua" in out["diff"]["after"]
    assert tree(dest) == {k: (v, "0o644") for k, v in FILES.items()}


def test_a_planted_link_is_replaced_never_written_through(tmp_path):
    dest = tmp_path / "lua"
    run(tmp_path, dest=str(dest), files=FILES)
    bait = tmp_path / "bait"
    bait.mkdir()
    (bait / "secret").write_text("root only\n")
    (bait / "a.lua").write_text("bait\n")
    (dest / "main.lua").unlink()
    (dest / "main.lua").symlink_to(bait / "secret")
    os.rename(dest / "pkg", tmp_path / "pkg.aside")
    (dest / "pkg").symlink_to(bait)
    out = run(tmp_path, dest=str(dest), files=FILES)
    assert out["changed"] is True and "main.lua" in out["written"] and "pkg/a.lua" in out["written"], out
    assert (bait / "secret").read_text() == "root only\n" and (bait / "a.lua").read_text() == "bait\n"
    assert not (dest / "main.lua").is_symlink() and not (dest / "pkg").is_symlink()
    assert tree(dest) == {k: (v, "0o644") for k, v in FILES.items()}


def test_a_dest_that_is_a_link_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "lua").symlink_to(real)
    out = run(tmp_path, dest=str(tmp_path / "lua"), files=FILES)
    assert out.get("failed") and "symbolic link" in out["msg"], out
    assert list(real.iterdir()) == []


def test_prune_removes_only_extra_files_of_its_suffix(tmp_path):
    dest = tmp_path / "lua"
    run(tmp_path, dest=str(dest), files=FILES)
    (dest / "pkg" / "old.lua").write_text("-- a module the role no longer has\n")
    (dest / "notes.txt").write_text("kept\n")
    out = run(tmp_path, dest=str(dest), files=FILES, prune=True)
    assert out["removed"] == ["pkg/old.lua"] and out["written"] == [], out
    assert not (dest / "pkg" / "old.lua").exists() and (dest / "notes.txt").exists()


def test_check_mode_reports_and_writes_nothing(tmp_path):
    dest = tmp_path / "lua"
    out = run(tmp_path, check=True, dest=str(dest), files=FILES)
    assert out["changed"] is True and out["written"] == sorted(FILES), out
    assert not dest.exists()
    run(tmp_path, dest=str(dest), files=FILES)
    (dest / "pkg" / "b.lua").write_text("changed\n")
    out = run(tmp_path, check=True, dest=str(dest), files=FILES)
    assert out["written"] == ["pkg/b.lua"] and (dest / "pkg" / "b.lua").read_text() == "changed\n", out


@pytest.mark.parametrize("bad", ["../x.lua", "/etc/x.lua", "a/../../x.lua", "a//b.lua", "./x.lua"])
def test_a_path_leaving_dest_is_refused(tmp_path, bad):
    out = run(tmp_path, dest=str(tmp_path / "lua"), files={bad: "x"})
    assert out.get("failed") and "plain relative path" in out["msg"], out


def test_base64_content_installs_bytes_that_are_not_text(tmp_path):
    blob = bytes(range(256)) * 3
    dest = tmp_path / "registry"
    files = {"blobs/sha256-x": base64.b64encode(blob).decode(), "manifests/m": base64.b64encode(b"{}\n").decode()}
    first = run(tmp_path, dest=str(dest), files=files, encoding="base64")
    assert first["changed"] is True and first["written"] == sorted(files), first
    assert (dest / "blobs" / "sha256-x").read_bytes() == blob and (dest / "manifests" / "m").read_bytes() == b"{}\n"
    assert run(tmp_path, dest=str(dest), files=files, encoding="base64")["changed"] is False
    bad = run(tmp_path, dest=str(dest), files={"blobs/y": "not base64!"}, encoding="base64")
    assert bad.get("failed") and "'blobs/y' is not valid base64" in bad["msg"], bad
    assert not (dest / "blobs" / "y").exists()
