"""mkmodels: Ollama's on-disk layout, deterministic bytes, digests that match their names."""

import hashlib
import json

from standins_lab import mkmodels


def test_layout_and_digests(tmp_path):
    mkmodels.write_models(str(tmp_path))
    for name in [*mkmodels.MODELS, *mkmodels.ALIASES]:
        model, tag = name.split(":")
        manifest_path = tmp_path / "manifests" / "registry.ollama.ai" / "library" / model / tag
        manifest = json.loads(manifest_path.read_text())
        assert manifest["schemaVersion"] == 2
        assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
        refs = [manifest["config"]] + manifest["layers"]
        assert {layer["mediaType"] for layer in manifest["layers"]} >= {"application/vnd.ollama.image.model"}
        for ref in refs:
            blob = tmp_path / "blobs" / ref["digest"].replace(":", "-")
            data = blob.read_bytes()
            assert len(data) == ref["size"] < 1024 * 1024
            assert "sha256:" + hashlib.sha256(data).hexdigest() == ref["digest"]
        model_blob = tmp_path / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")
        assert model_blob.read_bytes()[:4] == b"GGUF"
        config = json.loads((tmp_path / "blobs" / manifest["config"]["digest"].replace(":", "-")).read_text())
        spec = mkmodels.MODELS[mkmodels.ALIASES.get(name, name)]
        assert config["model_type"] == spec["parameter_size"]
        assert config["file_type"] == spec["quantization"]
        assert config["herd_lab"]["vram_mib"] == spec["vram_mib"]


def test_deterministic_and_idempotent(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert mkmodels.write_models(str(first)) > 0
    mkmodels.write_models(str(second))
    files_a = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert files_a == files_b
    assert all((first / rel).read_bytes() == (second / rel).read_bytes() for rel in files_a)
    assert mkmodels.write_models(str(first)) == 0


def test_latest_tag_is_the_same_manifest_as_its_sized_tag(tmp_path):
    """As in Ollama's library, herd-small:latest is herd-small:7b: one manifest, byte for byte, so one set of blobs."""
    assert mkmodels.ALIASES == {"herd-small:latest": "herd-small:7b"}
    mkmodels.write_models(str(tmp_path))
    library = tmp_path / "manifests" / "registry.ollama.ai" / "library"
    assert sorted(p.name for p in (library / "herd-small").iterdir()) == ["7b", "latest"]
    latest = (library / "herd-small" / "latest").read_bytes()
    assert latest == (library / "herd-small" / "7b").read_bytes()
    manifest = json.loads(latest)
    digests = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]
    assert all((tmp_path / "blobs" / d.replace(":", "-")).is_file() for d in digests)
    # only the tag written: the same bytes, the sized tag absent
    only = tmp_path / "only"
    assert mkmodels.main([str(only), "--model", "herd-small:latest"]) == 0
    assert [p.name for p in (only / "manifests" / "registry.ollama.ai" / "library" / "herd-small").iterdir()] == ["latest"]
    assert (only / "manifests" / "registry.ollama.ai" / "library" / "herd-small" / "latest").read_bytes() == latest
    assert sorted(p.name for p in (only / "blobs").iterdir()) == sorted(d.replace(":", "-") for d in digests)


def test_vram_needs_fit_the_lab_gpus():
    assert mkmodels.MODELS["herd-tiny:1b"]["vram_mib"] < 2048
    assert 5 * 1024 <= mkmodels.MODELS["herd-small:7b"]["vram_mib"] <= 6 * 1024
    large = mkmodels.MODELS["herd-large:70b"]["vram_mib"]
    assert 24564 < large <= 2 * 24564  # needs two 24 GB cards


def test_cli_subset(tmp_path):
    assert mkmodels.main([str(tmp_path), "--model", "herd-tiny:1b"]) == 0
    assert [p.name for p in (tmp_path / "manifests" / "registry.ollama.ai" / "library").iterdir()] == ["herd-tiny"]
    assert mkmodels.main([str(tmp_path), "--model", "nope:1b"]) == 2
