#!/usr/bin/env bash
# One command for herd's lab benchmark report: docs/benchmarks/<date>-lab.{md,json,png} (make bench).
# Runs on this machine's loopback only: emulated GPUs (lab/standins/ollama_emulator.py), nginx started
# from a private prefix with herd's gateway rendered by role gateway's own tasks (the project's .venv runs
# ansible-playbook: make bootstrap builds it), LiteLLM's proxy from a private venv. Needs root for apt-get
# when nginx or its Lua module is missing.
#   benchmarks/run.sh [gateway_bench.py options]      e.g. --skip-litellm, --short, --baseline-ref main
# HERD_BENCH_VENV  where the benchmark's Python environment lives (default /tmp/herd-bench/venv)
set -euo pipefail
cd "$(dirname "$0")/.."

LITELLM_VERSION=1.100.5     # newest release whose dependencies the project's PyPI mirror serves
MATPLOTLIB_VERSION=3.11.2
VENV=${HERD_BENCH_VENV:-/tmp/herd-bench/venv}

# nginx and the Lua module herd's gateway loads (Debian 12 main), as scripts/bootstrap.sh installs them.
missing=()
for p in nginx libnginx-mod-http-ndk libnginx-mod-http-lua lua-resty-core lua-cjson; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "run.sh: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/ansible-playbook ]; then
    echo "run.sh: .venv/bin/ansible-playbook is missing: run make bootstrap first (make bench does)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" - "$LITELLM_VERSION" "$MATPLOTLIB_VERSION" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
ok = m.version("litellm") == sys.argv[1] and m.version("matplotlib") == sys.argv[2]
import jinja2, yaml  # noqa: F401
sys.exit(0 if ok else 1)
PY
then
    echo "run.sh: installing the benchmark environment into $VENV" >&2
    if ! "$VENV/bin/pip" install -q "matplotlib==$MATPLOTLIB_VERSION" jinja2 pyyaml; then
        echo "run.sh: matplotlib/jinja2/pyyaml could not be installed" >&2
        exit 1
    fi
    # LiteLLM is optional: without it section 4 is reported as skipped with the reason.
    "$VENV/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION" \
        || echo "run.sh: litellm[proxy]==$LITELLM_VERSION could not be installed; section 4 will be skipped" >&2
fi

# The command recorded in the report, quoted so that it can be pasted back into a shell.
command="benchmarks/run.sh"
for arg in "$@"; do command+=" $(printf '%q' "$arg")"; done
exec "$VENV/bin/python" benchmarks/gateway_bench.py --command "$command" "$@"
