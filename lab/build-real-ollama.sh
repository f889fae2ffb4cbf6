#!/usr/bin/env bash
# herd LAB: a REAL Ollama server binary for the non-inference checks (the contract test and the host_roles
# scenario's real-binary lane), packed like Ollama's release archive, and a real model store made by it.
#
#   lab/build-real-ollama.sh OUTDIR
#
# The binary is Intel's ipex-llm build of Ollama 0.3.6 shipped in PyPI's bigdl-core-cpp wheel (Apache-2.0). It
# serves every non-inference endpoint for real and cannot generate here (its runners need an Intel GPU).
# Writes, deterministically (same input -> same bytes):
#   OUTDIR/cache/<wheel>                      the pinned wheel, checked against its sha256 (downloaded once)
#   OUTDIR/real/ollama-linux-amd64.tgz        bin/ollama (the real binary), .tgz like Ollama's releases before 0.14
#   OUTDIR/real/ollama-linux-amd64.tgz.sha256 "<hex>  ollama-linux-amd64.tgz"
#   OUTDIR/real/herd-real-tiny.gguf           a tiny llama GGUF with seeded random weights (lab/standins/mkgguf.py)
#   OUTDIR/real/store/                        a model store holding it as herd-real-tiny (no tag: :latest), made
#                                             by the real `ollama create`
# Nothing is rewritten when it is already there and right, so a second run changes nothing.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lab/archive-lib.sh
source "$here/archive-lib.sh"
repo="$(cd "$here/.." && pwd)"
outdir="$(mkdir -p "$1" && cd "$1" && pwd)"
python="${HERD_PYTHON:-$repo/.venv/bin/python}"

wheel_version="2.6.0b2"
wheel="bigdl_core_cpp-${wheel_version}-py3-none-manylinux2010_x86_64.whl"
wheel_sha256="72c3109cb7d567eda7b919fe0c7d0a79c0265dba261861edc7f79ea40d6c82a0"
archive="ollama-linux-amd64.tgz"
model="herd-real-tiny"

mkdir -p "$outdir/cache" "$outdir/real"
cached="$outdir/cache/$wheel"
if ! echo "$wheel_sha256  $cached" | sha256sum -c --status 2>/dev/null; then
    rm -f "$cached"
    echo "build-real-ollama: downloading bigdl-core-cpp==$wheel_version (Ollama 0.3.6 ipex-llm build, no dependencies)"
    "$python" -m pip download -q --no-deps --only-binary=:all: --platform manylinux2010_x86_64 \
        --dest "$outdir/cache" "bigdl-core-cpp==$wheel_version"
    if ! echo "$wheel_sha256  $cached" | sha256sum -c --status; then
        echo "build-real-ollama: $cached does not have the pinned sha256 $wheel_sha256" >&2
        rm -f "$cached"
        exit 1
    fi
fi

# Up to date: the same wheel, script and GGUF recipe made what is there, and it checks out.
stamp="$(cat "$0" "$here/archive-lib.sh" "$here/standins/mkgguf.py" | sha256sum | cut -d' ' -f1) $wheel_sha256"
if [[ "$(cat "$outdir/real/.built-from" 2>/dev/null)" == "$stamp" ]] \
        && (cd "$outdir/real" && sha256sum -c --status "$archive.sha256") \
        && [[ -f "$outdir/real/store/manifests/registry.ollama.ai/library/$model/latest" ]]; then
    echo "build-real-ollama: $outdir/real is up to date"
    exit 0
fi

stage="$(mktemp -d)"
server_pid=""
cleanup() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$stage"
}
trap cleanup EXIT

install -d -m 0755 "$stage/pkg/bin" "$stage/pkg/lib" "$stage/pkg/lib/ollama"
"$python" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("bigdl/cpp/libs/ollama"))' \
    "$cached" > "$stage/pkg/bin/ollama"
chmod 0755 "$stage/pkg/bin/ollama"
pack_release "$stage/pkg" "$stage" "$archive" gzip -n -9
changed=0
if install_changed "$stage" "$outdir/real" "$archive" "$archive.sha256"; then
    changed=1
fi

"$python" "$here/standins/mkgguf.py" "$stage/$model.gguf"
if ! cmp -s "$stage/$model.gguf" "$outdir/real/$model.gguf"; then
    install -m 0644 "$stage/$model.gguf" "$outdir/real/$model.gguf"
    rm -rf "$outdir/real/store"
    changed=1
fi

if [[ ! -f "$outdir/real/store/manifests/registry.ollama.ai/library/$model/latest" ]]; then
    # The real server on a free loopback port, with a private TMPDIR (it deletes $TMPDIR/ollama* it does not own).
    rm -rf "$outdir/real/store.new"
    mkdir -p "$outdir/real/store.new" "$stage/tmp" "$stage/home"
    port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    TMPDIR="$stage/tmp" HOME="$stage/home" OLLAMA_HOST="127.0.0.1:$port" OLLAMA_MODELS="$outdir/real/store.new" \
        OLLAMA_NOPRUNE=1 "$stage/pkg/bin/ollama" serve > "$stage/serve.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 100); do
        curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break
        sleep 0.1
    done
    printf 'FROM %s\n' "$outdir/real/$model.gguf" > "$stage/Modelfile"
    if ! TMPDIR="$stage/tmp" HOME="$stage/home" OLLAMA_HOST="127.0.0.1:$port" \
            "$stage/pkg/bin/ollama" create "$model" -f "$stage/Modelfile" > "$stage/create.log" 2>&1; then
        cat "$stage/create.log" "$stage/serve.log" >&2
        exit 1
    fi
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
    chmod -R u=rwX,go=rX "$outdir/real/store.new"
    rm -rf "$outdir/real/store"
    mv "$outdir/real/store.new" "$outdir/real/store"
    changed=1
fi

echo "$stamp" > "$outdir/real/.built-from"
if [[ $changed -eq 1 ]]; then
    echo "build-real-ollama: wrote $outdir/real/$archive ($(cut -d' ' -f1 "$outdir/real/$archive.sha256")) and the $model store"
else
    echo "build-real-ollama: $outdir/real is up to date"
fi
