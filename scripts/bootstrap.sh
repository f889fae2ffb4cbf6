#!/usr/bin/env bash
# Prepare this machine to run herd's lab and tests: Debian packages, a Docker engine, the Python venv and the
# lab base image herd-base:bookworm (`scripts/bootstrap.sh bookworm trixie` builds the Debian 13 one too).
# Safe to run again: every step checks first and is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: run as root (it installs Debian packages and starts dockerd)" >&2
    exit 1
  fi
}

apt_packages() {
  local missing=()
  # nginx + Lua: the gateway unit tests run the real nginx -t and the gateway's Lua module, and the gateway
  # benchmark's short mode (tests/unit/benchmarks) runs the rendered gateway in the real nginx.
  for p in docker.io debootstrap python3-venv python3-pip iproute2 curl ca-certificates zstd \
      nginx libnginx-mod-http-ndk libnginx-mod-http-lua lua-resty-core lua-cjson; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    need_root
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

docker_engine() {
  if docker info >/dev/null 2>&1; then
    return
  fi
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    log "starting docker.service"
    systemctl enable --now docker
  else
    # No service manager on this machine (a container or CI sandbox): run the engine ourselves.
    log "starting dockerd in the background (no systemd here); log: /var/log/herd-dockerd.log"
    need_root
    nohup dockerd --storage-driver=overlay2 >/var/log/herd-dockerd.log 2>&1 &
  fi
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return
    sleep 0.5
  done
  echo "bootstrap: the Docker engine did not answer within 30 s; see /var/log/herd-dockerd.log" >&2
  exit 1
}

python_venv() {
  local stamp=.venv/.herd-requirements.sha256
  local want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return
  fi
  log "creating .venv from requirements.txt"
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$stamp"
}

apt_packages
docker_engine
python_venv
for release in "${@:-bookworm}"; do
  scripts/build-image.sh "$release"
done
log "ready"
