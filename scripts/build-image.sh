#!/usr/bin/env bash
# Build the lab base image offline: debootstrap of Debian bookworm from this machine's configured mirror,
# imported into Docker as an image that boots systemd as PID 1. The image tag carries a hash of this recipe,
# so it is rebuilt only when the recipe changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=systemd,systemd-sysv,python3,python3-apt,dbus,iproute2,curl,ca-certificates,sudo,procps,gnupg,apt-transport-https
RECIPE_HASH=$( (cat "$0"; echo "$PACKAGES") | sha256sum | cut -c1-12)
IMAGE=${HERD_BASE_IMAGE:-herd-base:bookworm}
TAGGED="herd-base:bookworm-${RECIPE_HASH}"

if docker image inspect "$TAGGED" >/dev/null 2>&1; then
  docker tag "$TAGGED" "$IMAGE"
  exit 0
fi

mirror=$(grep -hoE '^(deb|URIs:)\s+http[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
           /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 | awk '{print $2}' || true)
mirror=${HERD_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}
root=$(mktemp -d /var/tmp/herd-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT

echo "[build-image] debootstrap bookworm from $mirror (about a minute)"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$mirror" >/var/tmp/herd-debootstrap.log 2>&1 || {
  tail -n 30 /var/tmp/herd-debootstrap.log >&2
  exit 1
}
: > "$root/etc/machine-id"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
# Units that make no sense in a container and slow its boot.
for u in systemd-remount-fs.service getty.target console-getty.service systemd-logind.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done
# Same mirror inside the hosts as on this machine.
cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/" 2>/dev/null || true
# STOPSIGNAL cannot be set by `docker import` on Docker 20.10: containers are started with --stop-signal SIGRTMIN+3.
tar -C "$root" -c . | docker import -c 'ENV container=docker' \
  -c 'CMD ["/lib/systemd/systemd"]' - "$TAGGED" >/dev/null
docker tag "$TAGGED" "$IMAGE"
echo "[build-image] built $TAGGED"
