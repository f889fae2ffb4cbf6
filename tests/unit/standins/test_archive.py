"""lab/build-ollama-archive.sh: Ollama's release layout (.tar.zst since 0.14), deterministic bytes, checksum, registry."""

import hashlib
import io
import os
import subprocess
import tarfile

from standins_lab import REPO

SCRIPT = REPO / "lab" / "build-ollama-archive.sh"
ARCHIVE = "ollama-linux-amd64.tar.zst"


def build(outdir):
    return subprocess.run([str(SCRIPT), str(outdir)], capture_output=True, text=True, check=True, timeout=60).stdout


def test_archive_layout_checksum_and_determinism(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert "wrote" in build(first)
    build(second)
    data = (first / ARCHIVE).read_bytes()
    assert data == (second / ARCHIVE).read_bytes()
    assert data[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    digest = hashlib.sha256(data).hexdigest()
    assert (first / f"{ARCHIVE}.sha256").read_text() == f"{digest}  {ARCHIVE}\n"
    plain = subprocess.run(["zstd", "-d", "-c", str(first / ARCHIVE)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"bin", "bin/ollama", "lib", "lib/ollama", "lib/ollama/README.herd-standin"}
        binary = members["bin/ollama"]
        assert binary.mode == 0o755 and binary.uid == 0 and binary.mtime == 0
        body = tar.extractfile(binary).read()
        assert body == (REPO / "lab" / "standins" / "ollama_emulator.py").read_bytes()
        assert b"NOT Ollama" in tar.extractfile(members["lib/ollama/README.herd-standin"]).read()
    assert (first / "registry" / "manifests" / "registry.ollama.ai" / "library" / "herd-tiny" / "1b").is_file()


def test_second_run_changes_nothing(tmp_path):
    build(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert "up to date" in build(tmp_path)
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


def test_archive_binary_runs_as_ollama(tmp_path):
    build(tmp_path)
    subprocess.run(["tar", "--zstd", "-xf", str(tmp_path / ARCHIVE), "-C", str(tmp_path)], check=True)
    ollama = tmp_path / "bin" / "ollama"
    assert os.access(ollama, os.X_OK)
    out = subprocess.run([str(ollama), "-v"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ollama version is ") and "herd-emulator" in out
