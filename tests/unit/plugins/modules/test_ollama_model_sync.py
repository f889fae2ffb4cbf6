"""Unit tests of plugins/modules/ollama_model_sync.py.

Every test builds small models in Ollama's real on-disk layout (manifests/<host>/<ns>/<model>/<tag>,
blobs/sha256-<hex>) with real sha256 digests in a tmp dir, drives main() with injected args and checks the
files on disk afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from herd_testing import load_module

ROOT = Path(__file__).resolve().parents[4]
MODULE_PATH = ROOT / "plugins" / "modules" / "ollama_model_sync.py"
MKMODELS = ROOT / "lab" / "standins" / "mkmodels.py"

oms = load_module("plugins/modules/ollama_model_sync.py", "herd_ollama_model_sync")


# ---------------------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------------------


class ModuleExit(Exception):
    def __init__(self, failed, result):
        super().__init__(result.get("msg"))
        self.failed = failed
        self.result = result


def _raise_on_exit(monkeypatch):
    """AnsibleModule's exit_json and fail_json raise ModuleExit(failed, result) instead of exiting."""

    def exit_json(self, **kwargs):
        raise ModuleExit(False, kwargs)

    def fail_json(self, **kwargs):
        raise ModuleExit(True, kwargs)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", fail_json)


@pytest.fixture
def run(monkeypatch):
    """Call main() with args; return (failed, result, log lines)."""
    logs = []

    _raise_on_exit(monkeypatch)
    monkeypatch.setattr(basic.AnsibleModule, "log", lambda self, msg, log_args=None: logs.append(msg))

    def _run(check=False, diff=False, **args):
        if check:
            args["_ansible_check_mode"] = True
        if diff:
            args["_ansible_diff"] = True
        with patch_module_args(args), pytest.raises(ModuleExit) as info:
            oms.main()
        return info.value.failed, info.value.result, logs

    return _run


def write_model(store, name_parts, layers, config=None):
    """Write one model into store; return (manifest path, [digests], {digest: bytes})."""
    store = Path(store)
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    config = config if config is not None else json.dumps({"model_format": "gguf", "name": name_parts[-2]}).encode()
    blobs = {}

    def entry(data, media):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        (store / "blobs" / digest.replace(":", "-")).write_bytes(data)
        return {"mediaType": media, "digest": digest, "size": len(data)}

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": entry(config, "application/vnd.docker.container.image.v1+json"),
        "layers": [entry(data, "application/vnd.ollama.image.model") for data in layers],
    }
    path = store.joinpath("manifests", *name_parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return path, list(blobs), blobs


def lib(model, tag="latest"):
    return ["registry.ollama.ai", "library", model, tag]


@pytest.fixture
def store(tmp_path):
    """A store with two models that share one blob (the template)."""
    s = tmp_path / "store"
    shared = b"{{ .System }} {{ .Prompt }}"
    a = write_model(s, lib("alpha", "1b"), [os.urandom(300_000) + b"alpha", shared])
    b = write_model(s, lib("beta"), [os.urandom(200_000) + b"beta", shared])
    return {"path": s, "alpha": a, "beta": b, "shared": "sha256:" + hashlib.sha256(shared).hexdigest()}


def blob(dest, digest):
    return Path(dest) / "blobs" / digest.replace(":", "-")


def tree(path):
    """(relative path, size, mtime_ns, inode) of every entry below path, to prove nothing changed."""
    out = []
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out.append((os.path.relpath(p, path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode))
    return sorted(out)


def sha(path):
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reflink_supported(directory):
    """Whether FICLONE works in directory (probe with two files)."""
    import fcntl

    a, b = os.path.join(directory, ".probe-a"), os.path.join(directory, ".probe-b")
    with open(a, "wb") as f:
        f.write(b"x" * 4096)
    try:
        with open(a, "rb") as fa, open(b, "wb") as fb:
            fcntl.ioctl(fb.fileno(), oms.FICLONE, fa.fileno())
        return True
    except OSError:
        return False
    finally:
        for p in (a, b):
            if os.path.exists(p):
                os.unlink(p)


# ---------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, parts",
    [
        ("qwen2.5:7b", ["registry.ollama.ai", "library", "qwen2.5", "7b"]),
        ("llama3", ["registry.ollama.ai", "library", "llama3", "latest"]),
        ("myuser/mymodel:q4", ["registry.ollama.ai", "myuser", "mymodel", "q4"]),
        ("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M", ["hf.co", "bartowski", "Llama-3.2-1B-GGUF", "Q4_K_M"]),
        ("mirror.local:5000/team/m:v1", ["mirror.local:5000", "team", "m", "v1"]),
        ("https://mirror.local/team/m", ["mirror.local", "team", "m", "latest"]),
        ("team/skill/helper:v2", ["registry.ollama.ai", "team", "skill", "helper", "v2"]),
    ],
)
def test_parse_name_follows_ollama(name, parts):
    assert oms.name_parts(oms.parse_name(name)) == parts


@pytest.mark.parametrize("name", ["", "/m", "m:", "a.b/m", "bad name", "-m", "m:t!", "x" * 81, "a/b/c/d/e"])
def test_parse_name_rejects_invalid(name):
    with pytest.raises(ValueError):
        oms.parse_name(name)


def test_parse_manifest_lists_config_first_and_dedupes():
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    text = json.dumps(
        {"config": {"digest": d1, "size": 10}, "layers": [{"digest": d2, "size": 5}, {"digest": d2, "size": 5}]}
    )
    assert [b["digest"] for b in oms.parse_manifest(text)] == [d1, d2]


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        json.dumps({"layers": []}),
        json.dumps({"layers": [{"digest": "sha256:abc", "size": 1}]}),
        json.dumps({"layers": [{"digest": "sha256:" + "a" * 64, "size": -1}]}),
        json.dumps({"layers": [{"digest": "sha256:" + "A" * 64, "size": 1}]}),
    ],
)
def test_parse_manifest_rejects_bad(text):
    with pytest.raises(ValueError):
        oms.parse_manifest(text)


MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 254:16 / /var/lib/herd rw,relatime shared:2 - xfs /dev/vdb rw,attr2
31 30 0:40 / /var/lib/herd/tmp\\040x rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/var/lib/herd/instances/0/models", ("xfs", "/var/lib/herd")),
        ("/var/lib/herdx", ("ext4", "/")),
        ("/var/lib/herd/tmp x/a", ("tmpfs", "/var/lib/herd/tmp x")),
    ],
)
def test_mount_fstype(path, expected):
    assert oms.mount_fstype(path, MOUNTINFO) == expected


# ---------------------------------------------------------------------------------------------------------
# main(): copy, idempotence, check mode
# ---------------------------------------------------------------------------------------------------------


def test_copy_writes_separate_verified_copies(run, store, tmp_path):
    dest = tmp_path / "inst0"
    failed, res, logs = run(src=str(store["path"]), dest=str(dest), models=["alpha:1b", "beta"])
    assert not failed, res["msg"]
    assert res["changed"] is True
    _, a_digests, a_blobs = store["alpha"]
    _, b_digests, b_blobs = store["beta"]
    every = {**a_blobs, **b_blobs}
    assert sorted(res["copied"]) == sorted(every)
    assert res["bytes_copied"] == sum(len(v) for v in every.values())
    for digest, data in every.items():
        p = blob(dest, digest)
        assert p.read_bytes() == data and sha(p) == digest
        assert p.stat().st_ino != blob(store["path"], digest).stat().st_ino
        assert oct(p.stat().st_mode & 0o777) == "0o644"
    for model in ("alpha", "beta"):
        src_manifest = store[model][0]
        rel = src_manifest.relative_to(store["path"])
        assert (dest / rel).read_bytes() == src_manifest.read_bytes()
    assert [m["digests"] for m in res["models"]] == [a_digests, b_digests]
    assert res["models"][0]["size"] == sum(len(a_blobs[d]) for d in a_digests)
    assert res["models"][0]["fullname"] == "registry.ollama.ai/library/alpha:1b"
    assert os.listdir(dest / ".herd-partial") == [".lock"]
    assert len(res["blobs"]) == len(every) and all(b["reason"] == "missing" for b in res["blobs"])
    assert any("copy sha256:" in line for line in logs)


def test_second_run_copies_nothing(run, store, tmp_path):
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b", "beta"])
    assert run(**args)[1]["changed"] is True
    before = tree(dest)
    failed, res, _ = run(**args)
    assert not failed
    assert res["changed"] is False
    assert res["copied"] == [] and res["linked"] == [] and res["bytes_copied"] == 0
    assert res["manifests_written"] == []
    assert tree(dest) == before


def test_check_mode_writes_nothing_on_empty_dest(run, store, tmp_path):
    dest = tmp_path / "inst0"
    failed, res, _ = run(check=True, diff=True, src=str(store["path"]), dest=str(dest), models=["alpha:1b"])
    assert not failed, res["msg"]
    assert res["changed"] is True
    assert sorted(res["copied"]) == sorted(store["alpha"][1])
    assert res["manifests_written"] == ["manifests/registry.ollama.ai/library/alpha/1b"]
    assert not dest.exists()
    assert "manifests/registry.ollama.ai/library/alpha/1b" in res["diff"]["after"]
    assert res["diff"]["before"] == ""


def test_check_mode_writes_nothing_on_damaged_dest(run, store, tmp_path):
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b", "beta"])
    run(**args)
    victim = blob(dest, store["alpha"][1][1])
    victim.write_bytes(b"short")
    (dest / ".herd-partial" / "sha256-dead-123").write_bytes(b"partial")
    before = tree(dest)
    failed, res, _ = run(check=True, prune=True, **{**args, "models": ["alpha:1b"]})
    assert not failed
    assert res["changed"] is True
    assert res["repaired"][0]["digest"] == store["alpha"][1][1]
    assert res["pruned_models"] == ["registry.ollama.ai/library/beta:latest"]
    assert res["stale_removed"] == ["sha256-dead-123"]
    assert tree(dest) == before


# ---------------------------------------------------------------------------------------------------------
# main(): methods
# ---------------------------------------------------------------------------------------------------------


def test_hardlink_shares_the_inode_and_is_idempotent(run, store, tmp_path):
    dest = tmp_path / "inst1"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b"], method="hardlink")
    failed, res, _ = run(**args)
    assert not failed, res["msg"]
    assert sorted(res["linked"]) == sorted(store["alpha"][1]) and res["copied"] == []
    assert res["bytes_copied"] == 0
    for digest in store["alpha"][1]:
        assert blob(dest, digest).stat().st_ino == blob(store["path"], digest).stat().st_ino
    assert run(**args)[1]["changed"] is False


def test_switching_from_hardlink_to_copy_breaks_the_links(run, store, tmp_path):
    dest = tmp_path / "inst1"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b"])
    run(method="hardlink", **args)
    failed, res, _ = run(method="copy", **args)
    assert not failed
    assert sorted(r["digest"] for r in res["repaired"]) == sorted(store["alpha"][1])
    for digest in store["alpha"][1]:
        assert blob(dest, digest).stat().st_ino != blob(store["path"], digest).stat().st_ino
        assert sha(blob(dest, digest)) == digest
    assert run(method="copy", **args)[1]["changed"] is False
    # and back: copies are replaced by links
    res = run(method="hardlink", **args)[1]
    assert sorted(res["linked"]) == sorted(store["alpha"][1])


def test_reflink_clones(run, store, tmp_path):
    if not reflink_supported(str(tmp_path)):
        fstype, mnt = oms.mount_fstype(str(tmp_path), Path("/proc/self/mountinfo").read_text())
        pytest.skip(f"{tmp_path} is on {fstype} (mount {mnt}), which cannot reflink (FICLONE)")
    dest = tmp_path / "inst2"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b"], method="reflink")
    failed, res, _ = run(**args)
    assert not failed, res["msg"]
    assert sorted(res["linked"]) == sorted(store["alpha"][1])
    for digest in store["alpha"][1]:
        assert blob(dest, digest).stat().st_ino != blob(store["path"], digest).stat().st_ino
        assert sha(blob(dest, digest)) == digest
    assert run(**args)[1]["changed"] is False


def test_reflink_unsupported_fails_naming_the_filesystem(run, store, tmp_path):
    if reflink_supported(str(tmp_path)):
        pytest.skip(f"{tmp_path} can reflink; the failure path cannot be shown here")
    fstype, _ = oms.mount_fstype(str(tmp_path), Path("/proc/self/mountinfo").read_text())
    dest = tmp_path / "inst2"
    failed, res, _ = run(src=str(store["path"]), dest=str(dest), models=["alpha:1b"], method="reflink")
    assert failed
    assert "method=reflink failed" in res["msg"] and f"{fstype} filesystem" in res["msg"]
    assert "method=copy" in res["msg"]
    assert [p for p in os.listdir(dest / "blobs")] == []
    assert os.listdir(dest / ".herd-partial") == [".lock"]
    assert not (dest / "manifests" / "registry.ollama.ai").exists()


# ---------------------------------------------------------------------------------------------------------
# main(): repair, interruption, verification
# ---------------------------------------------------------------------------------------------------------


def test_truncated_dest_blob_is_repaired(run, store, tmp_path):
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b"])
    run(**args)
    big = max(store["alpha"][2], key=lambda d: len(store["alpha"][2][d]))
    with open(blob(dest, big), "r+b") as f:
        f.truncate(1000)
    failed, res, _ = run(**args)
    assert not failed
    assert res["copied"] == [big]
    assert res["repaired"] == [{"digest": big, "reason": f"size 1000 != {len(store['alpha'][2][big])}"}]
    assert sha(blob(dest, big)) == big
    assert run(**args)[1]["changed"] is False


def test_same_size_corruption_needs_verify_existing(run, store, tmp_path):
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b"])
    run(**args)
    big = max(store["alpha"][2], key=lambda d: len(store["alpha"][2][d]))
    with open(blob(dest, big), "r+b") as f:
        f.seek(1234)
        f.write(b"\x00BITROT\x00")
    assert run(**args)[1]["changed"] is False  # size check only: cheap, by design
    failed, res, _ = run(verify_existing=True, **args)
    assert not failed
    assert res["copied"] == [big]
    assert res["repaired"][0]["reason"].startswith("content hashes to sha256:")
    assert sha(blob(dest, big)) == big
    assert run(verify_existing=True, **args)[1]["changed"] is False


def test_stale_temp_from_killed_run_is_cleaned_and_redone(run, store, tmp_path):
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b"])
    run(**args)
    big = max(store["alpha"][2], key=lambda d: len(store["alpha"][2][d]))
    blob(dest, big).unlink()
    (dest / "manifests/registry.ollama.ai/library/alpha/1b").unlink()
    stale = dest / ".herd-partial" / (big.replace(":", "-") + "-4242")
    stale.write_bytes(store["alpha"][2][big][:5000])  # what a killed copy leaves
    failed, res, _ = run(**args)
    assert not failed
    assert res["stale_removed"] == [stale.name]
    assert not stale.exists()
    assert res["copied"] == [big]
    assert sha(blob(dest, big)) == big
    assert res["manifests_written"] == ["manifests/registry.ollama.ai/library/alpha/1b"]


KILL_CHILD = textwrap.dedent(
    """
    import importlib.util, os, sys, time, json
    import ansible.module_utils
    from ansible.module_utils.testing import patch_module_args
    ansible.module_utils.__path__.append(sys.argv[3])
    spec = importlib.util.spec_from_file_location("m", sys.argv[1])
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    m.CHUNK = 64 * 1024
    real_write = os.write
    def slow_write(fd, data):
        time.sleep(0.02)
        return real_write(fd, data)
    m.os.write = slow_write
    with patch_module_args(json.loads(sys.argv[2])):
        m.main()
    """
)


def test_sigkill_mid_copy_never_leaves_a_bad_blob_and_next_run_repairs(run, tmp_path):
    store = tmp_path / "store"
    _, digests, blobs = write_model(store, lib("gamma", "3b"), [os.urandom(4 * 1024 * 1024)])
    big = max(blobs, key=lambda d: len(blobs[d]))
    dest = tmp_path / "inst0"
    args = {"src": str(store), "dest": str(dest), "models": ["gamma:3b"]}
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(MODULE_PATH), json.dumps(args), str(ROOT / "plugins" / "module_utils")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = dest / ".herd-partial"
    deadline = time.monotonic() + 20
    seen = False
    while time.monotonic() < deadline and child.poll() is None:
        temps = [p for p in partial.glob("sha256-*")] if partial.exists() else []
        if any(p.stat().st_size > 256 * 1024 for p in temps if p.exists()):
            seen = True
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    assert seen, "the child never got to write a partial copy"
    assert not blob(dest, big).exists()
    assert not (dest / "manifests/registry.ollama.ai/library/gamma/3b").exists()
    leftovers = [p.name for p in partial.glob("sha256-*")]
    assert leftovers
    failed, res, _ = run(**args)
    assert not failed, res["msg"]
    assert sorted(res["stale_removed"]) == sorted(leftovers)
    assert big in res["copied"]
    assert sha(blob(dest, big)) == big
    assert run(**args)[1]["changed"] is False


def test_corrupt_store_blob_fails_and_writes_nothing_under_final_name(run, tmp_path):
    store = tmp_path / "store"
    _, digests, blobs = write_model(store, lib("delta"), [os.urandom(100_000)])
    big = max(blobs, key=lambda d: len(blobs[d]))
    src_blob = blob(store, big)
    data = bytearray(src_blob.read_bytes())
    data[50_000] ^= 0xFF
    src_blob.write_bytes(bytes(data))
    for method in ("copy", "hardlink"):
        dest = tmp_path / f"inst-{method}"
        failed, res, _ = run(src=str(store), dest=str(dest), models=["delta"], method=method)
        assert failed
        assert f"digest mismatch for blob {big}" in res["msg"]
        assert str(src_blob) in res["msg"]
        assert not blob(dest, big).exists()
        assert os.listdir(dest / ".herd-partial") == [".lock"]
        assert not (dest / "manifests/registry.ollama.ai/library/delta/latest").exists()


def test_disk_full_mid_copy_fails_cleanly_and_next_run_repairs(run, store, tmp_path, monkeypatch):
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["alpha:1b"])
    real_write = os.write
    budget = {"left": 100_000}

    def full_write(fd, data):
        if budget["left"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        budget["left"] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(oms.os, "write", full_write)
    failed, res, _ = run(**args)
    assert failed
    assert "disk is full" in res["msg"]
    assert os.listdir(dest / ".herd-partial") == [".lock"]
    for digest in store["alpha"][1]:
        p = blob(dest, digest)
        assert not p.exists() or sha(p) == digest
    assert not (dest / "manifests/registry.ollama.ai/library/alpha/1b").exists()
    monkeypatch.setattr(oms.os, "write", real_write)
    failed, res, _ = run(**args)
    assert not failed
    for digest in store["alpha"][1]:
        assert sha(blob(dest, digest)) == digest


def test_not_enough_space_fails_before_writing(run, store, tmp_path, monkeypatch):
    dest = tmp_path / "inst0"
    dest.mkdir()
    real = os.statvfs(str(dest))

    class Tiny:
        f_bavail = 1
        f_frsize = real.f_frsize

    monkeypatch.setattr(oms.os, "statvfs", lambda path: Tiny)
    failed, res, _ = run(src=str(store["path"]), dest=str(dest), models=["alpha:1b"])
    assert failed
    assert "not enough space" in res["msg"] and "method=hardlink" in res["msg"]
    assert os.listdir(dest / "blobs") == []


def test_progress_is_logged_for_large_blobs(run, tmp_path, monkeypatch):
    store = tmp_path / "store"
    _, _, blobs = write_model(store, lib("eps"), [os.urandom(3 * 1024 * 1024 + 10)])
    monkeypatch.setattr(oms, "GIB", 1024 * 1024)
    monkeypatch.setattr(oms, "CHUNK", 256 * 1024)
    failed, res, logs = run(src=str(store), dest=str(tmp_path / "d"), models=["eps"])
    assert not failed
    progress = [line for line in logs if " of " in line]
    assert len(progress) == 3
    big = [b for b in res["blobs"] if b["size"] > 3 * 1024 * 1024][0]
    assert big["seconds"] >= 0 and "mib_per_s" in big


# ---------------------------------------------------------------------------------------------------------
# main(): prune, errors, attributes
# ---------------------------------------------------------------------------------------------------------


def test_prune_removes_unlisted_models_and_their_blobs(run, store, tmp_path):
    dest = tmp_path / "inst0"
    base = dict(src=str(store["path"]), dest=str(dest))
    run(models=["alpha:1b", "beta"], **base)
    (dest / "blobs" / "notes.txt").write_text("not ours")
    failed, res, _ = run(models=["alpha:1b"], **base)
    assert not failed and res["changed"] is False  # no prune: beta stays
    assert (dest / "manifests/registry.ollama.ai/library/beta/latest").exists()

    failed, res, _ = run(models=["alpha:1b"], prune=True, **base)
    assert not failed
    assert res["pruned_models"] == ["registry.ollama.ai/library/beta:latest"]
    beta_only = sorted(set(store["beta"][1]) - set(store["alpha"][1]))
    assert sorted(res["pruned_blobs"]) == beta_only
    for digest in beta_only:
        assert not blob(dest, digest).exists()
    assert blob(dest, store["shared"]).exists()
    assert not (dest / "manifests/registry.ollama.ai/library/beta").exists()
    assert (dest / "blobs" / "notes.txt").exists()
    assert run(models=["alpha:1b"], prune=True, **base)[1]["changed"] is False


def test_missing_model_names_model_store_and_remedy(run, store, tmp_path):
    dest = tmp_path / "inst0"
    failed, res, _ = run(src=str(store["path"]), dest=str(dest), models=["alpha:1b", "qwen2.5:7b"])
    assert failed
    assert "qwen2.5:7b" in res["msg"] and str(store["path"]) in res["msg"]
    assert "ollama pull" in res["msg"] and "offline model bundle" in res["msg"]
    assert not dest.exists()


def test_incomplete_store_names_the_blob(run, store, tmp_path):
    victim = store["alpha"][1][-1]
    blob(store["path"], victim).unlink()
    failed, res, _ = run(src=str(store["path"]), dest=str(tmp_path / "d"), models=["alpha:1b"])
    assert failed and victim in res["msg"] and "incomplete" in res["msg"]


def test_invalid_name_and_mode_are_rejected(run, store, tmp_path):
    failed, res, _ = run(src=str(store["path"]), dest=str(tmp_path / "d"), models=["bad name"])
    assert failed and "invalid model name" in res["msg"]
    failed, res, _ = run(src=str(store["path"]), dest=str(tmp_path / "d"), models=["beta"], mode="rw-r--r--")
    assert failed and "octal" in res["msg"]


def test_aliases_of_one_model_are_synced_once(run, store, tmp_path):
    failed, res, _ = run(
        src=str(store["path"]),
        dest=str(tmp_path / "d"),
        models=["beta", "beta:latest", "library/beta", "registry.ollama.ai/library/beta:latest"],
    )
    assert not failed
    assert len(res["models"]) == 1 and res["manifests_written"] == ["manifests/registry.ollama.ai/library/beta/latest"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_owner_group_mode_are_applied_and_converge(run, store, tmp_path):
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["beta"], owner="65534", group="65534", mode="0640")
    failed, res, _ = run(**args)
    assert not failed, res["msg"]
    for p in [blob(dest, d) for d in store["beta"][1]] + [dest / "manifests/registry.ollama.ai/library/beta/latest"]:
        st = p.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    st = (dest / "blobs").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o755)
    os.chmod(blob(dest, store["beta"][1][0]), 0o600)
    res = run(**args)[1]
    assert res["changed"] is True and res["copied"] == []
    assert blob(dest, store["beta"][1][0]).stat().st_mode & 0o777 == 0o640
    assert run(**args)[1]["changed"] is False


@pytest.mark.skipif(not MKMODELS.exists(), reason="lab/standins/mkmodels.py is not in this checkout")
def test_lab_models_sync(run, tmp_path):
    store = tmp_path / "store"
    subprocess.run(
        [sys.executable, str(MKMODELS), str(store), "--model", "herd-tiny:1b"], check=True, stdout=subprocess.DEVNULL
    )
    failed, res, _ = run(src=str(store), dest=str(tmp_path / "d"), models=["herd-tiny:1b"])
    assert not failed, res["msg"]
    for digest in res["models"][0]["digests"]:
        assert sha(blob(tmp_path / "d", digest)) == digest


def test_a_second_concurrent_sync_is_refused(run, store, tmp_path):
    import fcntl

    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["beta"])
    run(**args)
    blob(dest, store["beta"][1][-1]).unlink()
    with open(dest / ".herd-partial" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        failed, res, _ = run(**args)
    assert failed and "another model sync" in res["msg"]
    assert not blob(dest, store["beta"][1][-1]).exists()
    assert run(**args)[1]["copied"] == [store["beta"][1][-1]]


# ---------------------------------------------------------------------------------------------------------
# ollama_model_info (read-only companion; tested here as the sync's observer)
# ---------------------------------------------------------------------------------------------------------

omi = load_module("plugins/modules/ollama_model_info.py", "herd_ollama_model_info")


@pytest.mark.parametrize(
    "name",
    [
        "qwen2.5:7b",
        "llama3",
        "myuser/mymodel:q4",
        "mirror.local:5000/team/m:v1",
        "https://mirror.local/team/m",
        "team/skill/helper:v2",
        "h/team/agent/x:y",
    ],
)
def test_info_names_agree_with_sync(name):
    assert omi.qualify(name) == oms.full_name(oms.parse_name(name))


def run_info(monkeypatch, **args):
    _raise_on_exit(monkeypatch)
    with patch_module_args(args), pytest.raises(ModuleExit) as info:
        omi.main()
    return info.value.failed, info.value.result


def test_info_reports_synced_models_and_damage(run, store, tmp_path, monkeypatch):
    dest = tmp_path / "inst0"
    sync = run(src=str(store["path"]), dest=str(dest), models=["alpha:1b", "beta"])[1]
    failed, res = run_info(monkeypatch, path=str(dest), verify=True)
    assert not failed and res["ok"] is True and res["changed"] is False
    assert [m["name"] for m in res["models"]] == [m["fullname"] for m in sync["models"]]
    assert [m["id"] for m in res["models"]] == [m["id"] for m in sync["models"]]
    assert all(m["complete"] and m["verified"] for m in res["models"])
    assert res["orphan_blobs"] == [] and res["partial_files"] == []

    big = max(store["alpha"][2], key=lambda d: len(store["alpha"][2][d]))
    with open(blob(dest, big), "r+b") as f:
        f.write(b"XX")
    failed, res = run_info(monkeypatch, path=str(dest), models=["alpha:1b", "nope"], verify=True)
    assert res["ok"] is False and res["missing"] == ["nope"]
    (alpha,) = res["models"]
    assert alpha["complete"] is True and alpha["verified"] is False
    assert [b["digest"] for b in alpha["blobs"] if not b["verified"]] == [big]

    blob(dest, big).unlink()
    (dest / ".herd-partial" / "sha256-x-1").write_bytes(b"")
    (dest / "manifests/registry.ollama.ai/library/beta/latest").unlink()
    failed, res = run_info(monkeypatch, path=str(dest))
    assert [m["complete"] for m in res["models"]] == [False]
    assert sorted(res["orphan_blobs"]) == sorted(set(store["beta"][1]) - set(store["alpha"][1]))
    assert res["partial_files"] == ["sha256-x-1"]


# ---------------------------------------------------------------------------------------------------------
# Links: the store and the instance folders belong to the ollama account, the module runs as root. A link
# planted anywhere below src or dest must never be followed: the folder or file it points at (root's own,
# outside) keeps its owner, mode and contents. In dest a link is removed and herd's own folder or file is
# written instead (reported in links_replaced and a warning); in the store it is an error naming the path.
# ---------------------------------------------------------------------------------------------------------

BETA = "manifests/registry.ollama.ai/library/beta/latest"


@pytest.fixture
def bait(tmp_path):
    """A root-owned folder outside src and dest (mode 0700) with a root-owned file (mode 0600)."""
    b = tmp_path / "bait"
    b.mkdir()
    (b / "secret").write_bytes(b"root's own\n")
    os.chmod(b / "secret", 0o600)
    os.chmod(b, 0o700)
    return b


def bait_state(b):
    """Owner, mode and contents of the bait folder and every entry in it."""
    out = []
    for p in [b, *sorted(b.rglob("*"))]:
        st = p.lstat()
        out.append(
            (
                str(p.relative_to(b)),
                st.st_uid,
                st.st_gid,
                st.st_mode,
                st.st_ino,
                p.read_bytes() if p.is_file() else None,
            )
        )
    return out


def _beta_blob(store):
    return store["beta"][1][1]  # the model layer


# where the link goes, and whether it replaces a folder (the link points at the bait folder) or a file (at a bait file)
DEST_LINK_LEVELS = [
    ("manifests", "dir"),
    ("manifests/registry.ollama.ai", "dir"),
    ("manifests/registry.ollama.ai/library/beta", "dir"),
    (BETA, "file"),
    ("blobs", "dir"),
    ("blob", "file"),
    (".herd-partial", "dir"),
]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
@pytest.mark.parametrize("level,kind", DEST_LINK_LEVELS)
@pytest.mark.parametrize("method", ["copy", "hardlink"])
@pytest.mark.parametrize("when", ["fresh", "synced"])
def test_a_link_in_dest_is_replaced_never_followed(run, store, tmp_path, bait, level, kind, method, when):
    dest = tmp_path / "inst0" / "models"
    dest.parent.mkdir()
    args = dict(
        src=str(store["path"]),
        dest=str(dest),
        models=["beta"],
        method=method,
        owner="65534",
        group="65534",
        dir_mode="0750",
        prune=True,
    )
    if when == "synced":
        assert not run(**args)[0]
    rel = f"blobs/{_beta_blob(store).replace(':', '-')}" if level == "blob" else level
    link = dest / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        for p in sorted(link.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        link.rmdir()
    elif link.exists():
        link.unlink()
    if kind == "file":
        # same size as the real file, so only the link (not the size) can give it away
        real = store["path"] / rel
        (bait / "secret").write_bytes(real.read_bytes())
        os.chmod(bait / "secret", 0o600)
    link.symlink_to(bait / "secret" if kind == "file" else bait)
    before = bait_state(bait)

    failed, res, _ = run(**args)
    assert not failed, res["msg"]
    assert bait_state(bait) == before
    assert str(link) in res["links_replaced"] and "never followed" in res["msg"]
    # herd's own folder or file is in place, with herd's owner, and the model is whole
    st = link.lstat()
    assert not stat_is_link(st)
    # herd's own: the instance account's, except the temporaries folder, root's alone
    assert (st.st_uid, st.st_gid) == ((0, 0) if level == ".herd-partial" else (65534, 65534))
    assert (dest / BETA).read_bytes() == (store["path"] / BETA).read_bytes()
    for d in store["beta"][1]:
        assert not blob(dest, d).is_symlink() and sha(blob(dest, d)) == d
    again = run(**args)[1]
    assert again["changed"] is False and again["links_replaced"] == []


def stat_is_link(st):
    import stat as _stat

    return _stat.S_ISLNK(st.st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_dest_itself_a_link_made_by_the_instance_account_is_replaced(run, store, tmp_path, bait):
    inst = tmp_path / "inst0"
    inst.mkdir()
    os.chown(inst, 65534, 65534)  # the instance's own folder, writable by the ollama account
    (inst / "models").symlink_to(bait)
    os.lchown(inst / "models", 65534, 65534)
    before = bait_state(bait)
    failed, res, _ = run(src=str(store["path"]), dest=str(inst / "models"), models=["beta"], owner="65534")
    assert not failed, res["msg"]
    assert bait_state(bait) == before
    assert not (inst / "models").is_symlink() and (inst / "models" / BETA).is_file()


def test_dest_itself_a_link_root_made_in_roots_folder_is_kept(run, store, tmp_path):
    """An administrator's link (root's, in a folder only root writes) for the models folder is followed."""
    target = tmp_path / "bigdisk"
    target.mkdir()
    parent = tmp_path / "inst0"
    parent.mkdir(mode=0o755)
    (parent / "models").symlink_to(target)
    if os.geteuid() != 0:
        pytest.skip("a link root made needs root")
    failed, res, _ = run(src=str(store["path"]), dest=str(parent / "models"), models=["beta"])
    assert not failed, res["msg"]
    assert (parent / "models").is_symlink() and (target / BETA).is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_prune_never_follows_a_link(run, store, tmp_path, bait):
    """Prune walks manifests/ and blobs/ without entering links: an unlisted link is removed as a name only."""
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["beta"], prune=True, owner="65534")
    assert not run(**args)[0]
    (bait / "latest").write_text("{}")
    os.chmod(bait / "latest", 0o600)
    (dest / "manifests/registry.ollama.ai/library/gamma").symlink_to(bait)
    (dest / "manifests/registry.ollama.ai/library/beta/old").symlink_to(bait / "secret")
    (dest / "blobs" / ("sha256-" + "a" * 64)).symlink_to(bait / "secret")
    before = bait_state(bait)
    failed, res, _ = run(**args)
    assert not failed, res["msg"]
    assert bait_state(bait) == before
    assert res["pruned_blobs"] == ["sha256:" + "a" * 64]
    assert "registry.ollama.ai/library/beta:old" in res["pruned_models"]
    assert not (dest / "blobs" / ("sha256-" + "a" * 64)).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_a_blob_hard_linked_to_a_file_outside_is_replaced_not_chowned(run, store, tmp_path, bait):
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["beta"], owner="65534", group="65534")
    assert not run(**args)[0]
    d = _beta_blob(store)
    outside = bait / "hardlinked"
    outside.write_bytes(blob(dest, d).read_bytes())
    os.chmod(outside, 0o600)
    blob(dest, d).unlink()
    os.link(outside, blob(dest, d))
    before = bait_state(bait)
    failed, res, _ = run(**args)
    assert not failed, res["msg"]
    assert [r["digest"] for r in res["repaired"]] == [d] and "hard link" in res["repaired"][0]["reason"]
    assert bait_state(bait)[:-1] == before[:-1] and outside.stat().st_nlink == 1
    assert (outside.stat().st_uid, outside.stat().st_mode & 0o777) == (0, 0o600)


STORE_LINK_LEVELS = [
    ("manifests", "dir"),
    ("manifests/registry.ollama.ai/library", "dir"),
    ("manifests/registry.ollama.ai/library/beta", "dir"),
    (BETA, "file"),
    ("blobs", "dir"),
    ("blob", "file"),
]


@pytest.mark.parametrize("level,kind", STORE_LINK_LEVELS)
def test_a_link_in_the_store_is_refused_naming_the_path(run, store, tmp_path, bait, level, kind):
    src = store["path"]
    rel = f"blobs/{_beta_blob(store).replace(':', '-')}" if level == "blob" else level
    link = src / rel
    moved = tmp_path / "moved"
    os.rename(link, moved)  # the real content goes outside; a link to a copy of it takes its place
    target = bait / "real"
    os.rename(moved, target)
    link.symlink_to(target)
    before = bait_state(bait)
    dest = tmp_path / "inst0"
    failed, res, _ = run(src=str(src), dest=str(dest), models=["beta"])
    assert failed
    assert str(link) in res["msg"] and "never follows links" in res["msg"] and "remove" in res["msg"]
    assert bait_state(bait) == before
    assert not (dest / BETA).exists()
    assert not any(p.is_file() and p.name.startswith("sha256-") for p in dest.rglob("*"))


def test_a_fifo_where_a_blob_is_expected_never_hangs_the_run(run, store, tmp_path):
    """A FIFO is never opened: in dest it is replaced, in the store it is refused."""
    dest = tmp_path / "inst0"
    args = dict(src=str(store["path"]), dest=str(dest), models=["beta"])
    assert not run(**args)[0]
    d = _beta_blob(store)
    blob(dest, d).unlink()
    os.mkfifo(blob(dest, d))
    failed, res, _ = run(**args)
    assert not failed and str(blob(dest, d)) in res["links_replaced"] and sha(blob(dest, d)) == d
    blob(store["path"], d).unlink()
    os.mkfifo(blob(store["path"], d))
    failed, res, _ = run(**args)
    assert failed and "special file" in res["msg"] and str(blob(store["path"], d)) in res["msg"]
