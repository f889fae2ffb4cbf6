#!/usr/bin/env bash
# herd LAB: pack the Ollama API emulator (a stand-in, NOT Ollama) like Ollama's release archive, and write
# the lab model registry.
#
#   lab/build-ollama-archive.sh OUTDIR
#
# Writes, deterministically (same input -> same bytes and sha256):
#   OUTDIR/ollama-linux-amd64.tar.zst         bin/ollama (the emulator), lib/ollama/README (says it is a stand-in),
#                                             zstd-compressed like Ollama's Linux release since 0.14
#   OUTDIR/ollama-linux-amd64.tar.zst.sha256  "<hex>  ollama-linux-amd64.tar.zst"
#   OUTDIR/registry/                      lab models in Ollama's on-disk layout (served by herd-lab-registry)
# Files whose content did not change are left untouched, so a second run changes nothing.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lab/archive-lib.sh
source "$here/archive-lib.sh"
outdir="$1"
archive="ollama-linux-amd64.tar.zst"
mkdir -p "$outdir"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

install -d -m 0755 "$stage/bin" "$stage/lib" "$stage/lib/ollama"
install -m 0755 "$here/standins/ollama_emulator.py" "$stage/bin/ollama"
cat > "$stage/lib/ollama/README.herd-standin" <<'EOF'
This archive is herd's LAB STAND-IN for Ollama's release archive. It is NOT Ollama.

bin/ollama is herd's Ollama API emulator (lab/standins/ollama_emulator.py, Python standard library only).
It runs no model: it answers Ollama's HTTP API with made-up text at a simulated GPU token rate so that
herd's lab can test installs, units, load balancing, queueing and rolling re-deploys without a GPU.
Real Ollama ships its GPU runner libraries in this folder; the emulator needs none.
EOF
chmod 0644 "$stage/lib/ollama/README.herd-standin"

pack_release "$stage" "$stage" "$archive" zstd -q -19 --no-progress -c

changed=0
if install_changed "$stage" "$outdir" "$archive" "$archive.sha256"; then
    changed=1
fi

python3 "$here/standins/mkmodels.py" "$outdir/registry" >/dev/null

if [[ $changed -eq 1 ]]; then
    echo "build-ollama-archive: wrote $outdir/$archive ($(cut -d' ' -f1 "$outdir/$archive.sha256"))"
else
    echo "build-ollama-archive: $outdir/$archive is up to date"
fi
