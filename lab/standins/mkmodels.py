#!/usr/bin/env python3
"""herd LAB STAND-IN: write small lab models in Ollama's on-disk layout.

NOT real models. Each model is a GGUF file with metadata and no tensors, plus
the template/params/license layers and a config blob, laid out exactly as
Ollama stores pulled models:

    OUT/manifests/registry.ollama.ai/library/NAME/TAG   (Docker v2 manifest)
    OUT/blobs/sha256-HEX                                 (content-addressed)

The config blob carries Ollama's own keys (model_format, model_family,
model_type = parameter size, file_type = quantization) plus a ``herd_lab``
section that only herd's Ollama emulator reads: declared VRAM need, load time
and token rates. Bytes are deterministic, so digests are stable across runs
and machines. Standard library only.

``herd-embed:v1`` is an embedding-only model (a nomic-bert stand-in): its GGUF carries
``nomic-bert.pooling_type``, which makes Ollama (and the emulator) list it with the capability
``embedding`` only, refuse generate and chat on it, and embed with it. It has no template layer.
The chat models' template uses ``.Tools``, which gives them the capability ``tools`` as in Ollama.

One model is also published under the tag ``latest`` (ALIASES), as Ollama's library
publishes ``qwen2.5:latest`` as the same manifest as ``qwen2.5:7b``: a name written
without a tag (``herd-small``) pulls it, and both tags share every blob.

Usage: mkmodels.py OUTDIR [--model NAME:TAG ...] [--list]
"""

import argparse
import hashlib
import json
import os
import struct
import sys

REGISTRY_HOST = "registry.ollama.ai"
NAMESPACE = "library"

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_LICENSE = "application/vnd.ollama.image.license"

# GGUF file_type numbers (llama.cpp's llama_ftype) for the quantizations used here.
GGUF_FILE_TYPES = {"F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}

# The lab catalogue. vram_mib is the weights' GPU memory; the emulator adds the KV cache,
# num_parallel x context x kv_mib_per_1k_ctx / 1024 (the figure of the real architecture
# the model stands in for: Llama 3.2 1B, Qwen2.5 7B, Llama 3.x 70B, nomic-embed-text); the rates are per slot.
# embedding_length is the GGUF's <arch>.embedding_length (the emulator's vector length); a model with
# pooling_type (<arch>.pooling_type, 1 = mean) is embedding-only and has no chat template.
MODELS = {
    "herd-tiny:1b": {
        "family": "llama",
        "parameter_size": "1.2B",
        "parameter_count": 1_235_814_400,
        "quantization": "Q4_K_M",
        "context_length": 8192,
        "embedding_length": 2048,
        "vram_mib": 1536,
        "kv_mib_per_1k_ctx": 32,
        "load_seconds": 0.4,
        "tokens_per_second": 140.0,
        "prompt_tokens_per_second": 4000.0,
        "busy_slowdown": 0.8,
        "blob_kib": 64,
    },
    "herd-small:7b": {
        "family": "qwen2",
        "parameter_size": "7.6B",
        "parameter_count": 7_615_616_512,
        "quantization": "Q4_K_M",
        "context_length": 32768,
        "embedding_length": 3584,
        "vram_mib": 5632,
        "kv_mib_per_1k_ctx": 56,
        "load_seconds": 1.5,
        "tokens_per_second": 55.0,
        "prompt_tokens_per_second": 1800.0,
        "busy_slowdown": 0.75,
        "blob_kib": 128,
    },
    "herd-large:70b": {
        "family": "llama",
        "parameter_size": "70.6B",
        "parameter_count": 70_553_706_496,
        "quantization": "Q4_K_M",
        "context_length": 8192,
        "embedding_length": 8192,
        "vram_mib": 43008,
        "kv_mib_per_1k_ctx": 320,
        "load_seconds": 6.0,
        "tokens_per_second": 14.0,
        "prompt_tokens_per_second": 400.0,
        "busy_slowdown": 0.7,
        "blob_kib": 256,
    },
    "herd-embed:v1": {
        "family": "nomic-bert",
        "parameter_size": "137M",
        "parameter_count": 136_727_040,
        "quantization": "F16",
        "context_length": 2048,
        "embedding_length": 768,
        "pooling_type": 1,
        "vram_mib": 320,
        "kv_mib_per_1k_ctx": 6,
        "load_seconds": 0.3,
        "tokens_per_second": 1.0,
        "prompt_tokens_per_second": 8000.0,
        "busy_slowdown": 0.9,
        "blob_kib": 64,
    },
}

# Tags that are the same manifest as a catalogue entry, byte for byte (same digests), as Ollama's library tags
# `latest`: a tagless `herd-small` means `herd-small:latest`, which is herd-small:7b.
ALIASES = {
    "herd-small:latest": "herd-small:7b",
}

# A chat template that renders the tools offered and the tool calls of earlier turns (so Ollama lists "tools").
TEMPLATE = (
    "{{- if .Tools }}<|tools|>\n{{ range .Tools }}{{ .Function.Name }}: {{ .Function.Description }}\n{{ end }}"
    "<|end|>\n{{ end }}"
    "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}"
    "{{ range .ToolCalls }}<|tool_call|>{{ .Function.Name }} {{ .Function.Arguments }}{{ end }}<|end|>\n{{ end }}"
    "<|assistant|>\n"
)
LICENSE = (
    "herd lab stand-in model. Contains no weights and produces no real text.\n"
    "Generated by herd's lab/standins/mkmodels.py for testing only.\n"
)


def _gguf_string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf_kv(key, vtype, value):
    out = _gguf_string(key) + struct.pack("<I", vtype)
    if vtype == 8:  # string
        out += _gguf_string(value)
    elif vtype == 4:  # uint32
        out += struct.pack("<I", value)
    elif vtype == 10:  # uint64
        out += struct.pack("<Q", value)
    else:
        raise ValueError(vtype)
    return out


def gguf_bytes(name, spec):
    """A GGUF v3 file with metadata only, padded with deterministic filler."""
    arch = spec["family"]
    kvs = [
        _gguf_kv("general.architecture", 8, arch),
        _gguf_kv("general.name", 8, name),
        _gguf_kv("general.description", 8, "herd lab stand-in model (no weights)"),
        _gguf_kv("general.parameter_count", 10, spec["parameter_count"]),
        _gguf_kv("general.file_type", 4, GGUF_FILE_TYPES[spec["quantization"]]),
        _gguf_kv(arch + ".context_length", 4, spec["context_length"]),
        _gguf_kv(arch + ".embedding_length", 4, spec["embedding_length"]),
    ]
    if "pooling_type" in spec:
        kvs.append(_gguf_kv(arch + ".pooling_type", 4, spec["pooling_type"]))
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)
    header += b"\0" * (-len(header) % 32)
    size = spec["blob_kib"] * 1024
    filler = bytearray()
    block = hashlib.sha256(name.encode()).digest()
    while len(header) + len(filler) < size:
        block = hashlib.sha256(block).digest()
        filler += block
    return header + bytes(filler[: size - len(header)])


def split_name(name):
    """'herd-tiny:1b' -> ('herd-tiny', '1b'); default tag 'latest'."""
    model, _, tag = name.partition(":")
    return model, tag or "latest"


def model_files(name, spec):
    """Return (manifest_bytes, {digest_hex: bytes}) for one lab model."""
    layers = [(MEDIA_MODEL, gguf_bytes(name, spec)), (MEDIA_LICENSE, LICENSE.encode())]
    if "pooling_type" not in spec:  # an embedding model has no chat template and no stop words
        layers[1:1] = [(MEDIA_TEMPLATE, TEMPLATE.encode())]
        layers.append((MEDIA_PARAMS, json.dumps({"stop": ["<|end|>"]}, sort_keys=True).encode()))
    blobs = {}
    layer_refs = []
    for media, data in layers:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        layer_refs.append({"mediaType": media, "digest": "sha256:" + digest, "size": len(data)})
    config = {
        "model_format": "gguf",
        "model_family": spec["family"],
        "model_families": [spec["family"]],
        "model_type": spec["parameter_size"],
        "file_type": spec["quantization"],
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [ref["digest"] for ref in layer_refs]},
        "herd_lab": {
            "standin": True,
            "parameter_count": spec["parameter_count"],
            "context_length": spec["context_length"],
            "vram_mib": spec["vram_mib"],
            "kv_mib_per_1k_ctx": spec["kv_mib_per_1k_ctx"],
            "load_seconds": spec["load_seconds"],
            "tokens_per_second": spec["tokens_per_second"],
            "prompt_tokens_per_second": spec["prompt_tokens_per_second"],
            "busy_slowdown": spec["busy_slowdown"],
        },
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    blobs[config_digest] = config_bytes
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": "sha256:" + config_digest, "size": len(config_bytes)},
        "layers": layer_refs,
    }
    return json.dumps(manifest, sort_keys=True).encode(), blobs


def _write_if_changed(path, data):
    try:
        with open(path, "rb") as handle:
            if handle.read() == data:
                return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)
    return True


def write_models(outdir, names=None):
    """Write the named lab models and tags (default: all, ALIASES included) under outdir; return the count of
    files changed. A tag of ALIASES gets the manifest and blobs of the catalogue entry it names."""
    changed = 0
    for name in names or sorted([*MODELS, *ALIASES]):
        source = ALIASES.get(name, name)
        if source not in MODELS:
            known = ", ".join(sorted([*MODELS, *ALIASES]))
            raise KeyError(f"unknown lab model {name!r} (known: {known})")
        manifest, blobs = model_files(source, MODELS[source])
        for digest, data in sorted(blobs.items()):
            changed += _write_if_changed(os.path.join(outdir, "blobs", "sha256-" + digest), data)
        model, tag = split_name(name)
        path = os.path.join(outdir, "manifests", REGISTRY_HOST, NAMESPACE, model, tag)
        changed += _write_if_changed(path, manifest)
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write herd's lab stand-in models in Ollama's on-disk layout.")
    parser.add_argument("outdir", nargs="?", help="models directory (like OLLAMA_MODELS)")
    parser.add_argument("--model", action="append", help="NAME:TAG to write (repeatable; default: all)")
    parser.add_argument("--list", action="store_true", help="print the catalogue as JSON and exit")
    args = parser.parse_args(argv)
    if args.list:
        json.dump(MODELS, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    if not args.outdir:
        parser.error("outdir is required")
    try:
        changed = write_models(args.outdir, args.model)
    except KeyError as exc:
        sys.stderr.write(f"mkmodels: {exc.args[0]}\n")
        return 2
    print(f"mkmodels: {changed} file(s) written under {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
