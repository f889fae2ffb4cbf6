#!/usr/bin/env bash
# The local lab: three real systemd hosts (containers booted from herd-base:bookworm) on the docker network
# herd-lab, deployed by site.yml exactly as production hosts are.
#   scripts/lab.sh up      create the hosts, install the lab stand-ins, run site.yml, smoke through the gateway
#   scripts/lab.sh down    remove the hosts and the network
#   scripts/lab.sh status  the instance table
set -euo pipefail
cd "$(dirname "$0")/.."
export ANSIBLE_CONFIG="$PWD/ansible.cfg"
BIN=.venv/bin
NET=${HERD_LAB_NETWORK:-herd-lab}
SUBNET=${HERD_LAB_SUBNET:-172.29.213.0/24}
GW_PORT=${HERD_LAB_GATEWAY_PORT:-8080}
IMAGE=${HERD_BASE_IMAGE:-herd-base:bookworm}
HOSTS=(gw gpu1 gpu2)

log() { printf '\033[1m[lab]\033[0m %s\n' "$*"; }

boot_host() {
  local name="herd-lab-$1"; shift
  if docker container inspect "$name" >/dev/null 2>&1; then
    docker start "$name" >/dev/null
    return
  fi
  docker run -d --name "$name" --hostname "$name" --network "$NET" \
    --cap-add SYS_ADMIN --cap-add NET_ADMIN --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
    --tmpfs /run --tmpfs /tmp --stop-signal SIGRTMIN+3 \
    --label herd.lab=1 "$@" "$IMAGE" >/dev/null
}

wait_systemd() {
  local name="herd-lab-$1" state=""
  for _ in $(seq 1 60); do
    state=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) return 0 ;; esac
    sleep 1
  done
  echo "lab: $name did not finish booting (systemd says '$state')" >&2
  docker exec "$name" systemctl --failed --no-pager >&2 || true
  return 1
}

up() {
  docker network inspect "$NET" >/dev/null 2>&1 || {
    log "creating network $NET ($SUBNET)"
    docker network create --subnet "$SUBNET" --label herd.lab=1 "$NET" >/dev/null
  }
  log "booting hosts: ${HOSTS[*]}"
  boot_host gw -p "127.0.0.1:${GW_PORT}:80"
  boot_host gpu1
  boot_host gpu2
  for h in "${HOSTS[@]}"; do wait_systemd "$h"; done
  log "installing the lab stand-ins (nvidia-smi, GPU specs, model registry)"
  $BIN/ansible-playbook -i inventories/lab playbooks/lab.yml
  log "deploying: ansible-playbook site.yml -i inventories/lab"
  $BIN/ansible-playbook -i inventories/lab site.yml
  log "asking the gateway: curl http://127.0.0.1:${GW_PORT}/api/version"
  local ok=""
  for _ in $(seq 1 20); do
    if curl -fsS "http://127.0.0.1:${GW_PORT}/api/version"; then ok=1; echo; break; fi
    sleep 1
  done
  [ -n "$ok" ] || { echo "lab: the gateway did not answer on 127.0.0.1:${GW_PORT}" >&2; exit 1; }
  curl -fsS "http://127.0.0.1:${GW_PORT}/api/generate" \
    -d '{"model":"herd-tiny:1b","prompt":"Hello from the lab","stream":false,"options":{"num_predict":8}}' \
    -D /dev/stderr | head -c 400; echo
  status
  cat <<EOT

The lab is up.
  Gateway:   http://127.0.0.1:${GW_PORT}   (inside the lab network: http://herd-lab-gw)
  Try:       curl http://127.0.0.1:${GW_PORT}/api/tags
  Status:    scripts/lab.sh status
  Tear down: make lab-down
EOT
}

status() {
  $BIN/ansible-playbook -i inventories/lab playbooks/status.yml
}

down() {
  log "removing the lab hosts and network"
  for h in "${HOSTS[@]}"; do docker rm -f "herd-lab-$h" >/dev/null 2>&1 || true; done
  docker network rm "$NET" >/dev/null 2>&1 || true
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
