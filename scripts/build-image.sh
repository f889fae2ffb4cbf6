#!/usr/bin/env bash
# Build the lab base image offline: debootstrap of a Debian release (bookworm by default, or trixie) from this
# machine's configured mirror, imported into Docker as an image that boots systemd as PID 1. The image tag
# carries a hash of this recipe, so it is rebuilt only when the recipe changes.
#   scripts/build-image.sh            # herd-base:bookworm
#   scripts/build-image.sh trixie     # herd-base:trixie
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASE=${1:-bookworm}
case "$RELEASE" in
  bookworm | trixie) ;;
  *) echo "build-image: unknown Debian release '$RELEASE' (use bookworm or trixie)" >&2; exit 2 ;;
esac

PACKAGES=systemd,systemd-sysv,python3,python3-apt,dbus,iproute2,curl,ca-certificates,sudo,procps,gnupg,apt-transport-https
RECIPE_HASH=$( (cat "$0"; echo "$PACKAGES $RELEASE") | sha256sum | cut -c1-12)
IMAGE="herd-base:${RELEASE}"
[ "$RELEASE" = bookworm ] && IMAGE=${HERD_BASE_IMAGE:-$IMAGE}
TAGGED="herd-base:${RELEASE}-${RECIPE_HASH}"

if docker image inspect "$TAGGED" >/dev/null 2>&1; then
  docker tag "$TAGGED" "$IMAGE"
  exit 0
fi

mirror=$(grep -hoE '^(deb|URIs:)\s+http[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
           /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 | awk '{print $2}' || true)
mirror=${HERD_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}
root=$(mktemp -d "/var/tmp/herd-rootfs-${RELEASE}.XXXXXX")
trap 'rm -rf "$root"' EXIT

log=/var/tmp/herd-debootstrap-${RELEASE}.log
echo "[build-image] debootstrap $RELEASE from $mirror (about a minute)"
debootstrap --variant=minbase --include="$PACKAGES" "$RELEASE" "$root" "$mirror" >"$log" 2>&1 || {
  tail -n 30 "$log" >&2
  exit 1
}
: > "$root/etc/machine-id"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
# Units that make no sense in a container and slow its boot.
for u in systemd-remount-fs.service getty.target console-getty.service systemd-logind.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done
# Same mirror inside the hosts as on this machine, for the image's own release.
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  host_release=$(awk '/^Suites:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  sed -E "s/\\b${host_release:-bookworm}(-updates|-security)?\\b/${RELEASE}\\1/g" \
    /etc/apt/sources.list.d/debian.sources >"$root/etc/apt/sources.list.d/debian.sources"
  rm -f "$root/etc/apt/sources.list"
fi
# STOPSIGNAL cannot be set by `docker import` on Docker 20.10: containers are started with --stop-signal SIGRTMIN+3.
tar -C "$root" -c . | docker import -c 'ENV container=docker' \
  -c 'CMD ["/lib/systemd/systemd"]' - "$TAGGED" >/dev/null
docker tag "$TAGGED" "$IMAGE"
echo "[build-image] built $TAGGED"
