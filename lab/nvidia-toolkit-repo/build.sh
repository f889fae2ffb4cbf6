#!/usr/bin/env bash
# Build herd's lab stand-in for NVIDIA's container toolkit apt repository: a signed flat apt repository
# (Packages, Release, InRelease, Release.gpg, gpgkey) holding two versions of a LAB STAND-IN package named
# nvidia-container-toolkit. Its nvidia-ctk edits Docker's daemon.json the way the real one does; its
# nvidia-container-runtime refuses to run; its nvidia-container-runtime-hook (Docker's GPU device-request hook)
# mounts nothing and only logs each call, so `--gpus`/device requests run through Docker's real nvidia driver. Lab only: never publish it, never install it on a real GPU host.
#
# Usage: build.sh OUTDIR     then serve OUTDIR over http and point the role at it:
#   nvidia_container_toolkit_apt_repo_url: http://HOST:PORT
#   nvidia_container_toolkit_gpg_key_url:  http://HOST:PORT/gpgkey
# Needs: bash, dpkg-deb, gpg, sha256sum, md5sum, gzip (all present on the lab base image).
set -euo pipefail

out=${1:?usage: build.sh OUTDIR}
versions=${HERD_LAB_NVCT_VERSIONS:-"1.17.7-1 1.17.8-1"}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/herd-nvct.XXXXXX")
trap 'rm -rf "$work"' EXIT

mkdir -p "$out"
rm -f "$out"/*.deb "$out"/Packages* "$out"/Release* "$out"/InRelease "$out"/gpgkey

for version in $versions; do
  pkg="$work/pkg-$version"
  install -d -m 0755 "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/usr/share/doc/nvidia-container-toolkit"
  install -m 0755 "$here/nvidia-ctk" "$pkg/usr/bin/nvidia-ctk"
  sed -i "s/@VERSION@/$version/" "$pkg/usr/bin/nvidia-ctk"
  cat >"$pkg/usr/bin/nvidia-container-runtime-hook" <<'HOOK'
#!/usr/bin/env python3
"""herd LAB STAND-IN for nvidia-container-runtime-hook (NOT NVIDIA software; there is no GPU in the lab).

Docker registers its "nvidia" device driver only when this program is on PATH (daemon/nvidia_linux.go), and
for a container started with a GPU device request it sets NVIDIA_VISIBLE_DEVICES (the requested IDs) and
NVIDIA_DRIVER_CAPABILITIES in the container's environment and adds this program as an OCI prestart hook:
    nvidia-container-runtime-hook prestart      (container state JSON on stdin)
The real hook mounts the GPUs and the driver into the container. This stand-in mounts nothing: it reads the
state and the bundle's config.json and appends one JSON line per call to the log below, so the lab can prove
that Docker's real device-request path ran with the right GPUs. Any other call is accepted and logged too.
"""

import datetime
import json
import os
import sys

LOG = os.environ.get("HERD_LAB_NVIDIA_HOOK_LOG", "/var/log/herd-lab/nvidia-container-runtime-hook.log")


def container_env(bundle):
    try:
        with open(os.path.join(bundle, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return {}
    pairs = (item.partition("=") for item in config.get("process", {}).get("env", []))
    return {key: value for key, _, value in pairs if key.startswith("NVIDIA_")}


def main(argv):
    try:
        state = json.load(sys.stdin)
    except ValueError:
        state = {}
    bundle = state.get("bundle", "")
    env = container_env(bundle) if bundle else {}
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": argv[1:],
        "id": state.get("id", ""),
        "pid": state.get("pid"),
        "visible_devices": env.get("NVIDIA_VISIBLE_DEVICES", ""),
        "driver_capabilities": env.get("NVIDIA_DRIVER_CAPABILITIES", ""),
        "standin": "herd lab: nothing mounted",
    }
    os.makedirs(os.path.dirname(LOG), exist_ok=True)
    with open(LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
HOOK
  chmod 0755 "$pkg/usr/bin/nvidia-container-runtime-hook"
  cat >"$pkg/usr/bin/nvidia-container-runtime" <<'RUNTIME'
#!/bin/sh
echo "nvidia-container-runtime: herd lab stand-in; there is no NVIDIA runtime in the lab" >&2
exit 1
RUNTIME
  chmod 0755 "$pkg/usr/bin/nvidia-container-runtime"
  printf 'herd lab stand-in for nvidia-container-toolkit %s. Not NVIDIA software.\n' "$version" \
    >"$pkg/usr/share/doc/nvidia-container-toolkit/README.herd-lab"
  cat >"$pkg/DEBIAN/control" <<CONTROL
Package: nvidia-container-toolkit
Version: $version
Architecture: all
Maintainer: herd lab <lab@herd.invalid>
Depends: python3
Section: utils
Priority: optional
Description: HERD LAB STAND-IN for the NVIDIA Container Toolkit (not NVIDIA software)
 Built by herd's lab/nvidia-toolkit-repo/build.sh so that the nvidia_container_toolkit role's
 repository, key, package and daemon.json steps run for real where NVIDIA's repository is unreachable.
 nvidia-ctk only edits Docker's daemon.json; nvidia-container-runtime refuses to run;
 nvidia-container-runtime-hook mounts no GPU and only logs to /var/log/herd-lab/.
CONTROL
  dpkg-deb --root-owner-group -Zgzip --build "$pkg" "$out/nvidia-container-toolkit_${version}_all.deb" >/dev/null
done

# Flat repository index, the layout of NVIDIA's own (deb URL /).
(
  cd "$out"
  : >Packages
  for deb in *.deb; do
    dpkg-deb -f "$deb" >>Packages
    {
      echo "Filename: ./$deb"
      echo "Size: $(stat -c %s "$deb")"
      echo "MD5sum: $(md5sum "$deb" | cut -d' ' -f1)"
      echo "SHA256: $(sha256sum "$deb" | cut -d' ' -f1)"
      echo
    } >>Packages
  done
  gzip -9nc Packages >Packages.gz
  {
    echo "Origin: herd-lab"
    echo "Label: herd lab stand-in nvidia-container-toolkit"
    echo "Date: $(LC_ALL=C date -u '+%a, %d %b %Y %H:%M:%S UTC')"
    echo "Architectures: all amd64 arm64"
    echo "MD5Sum:"
    for f in Packages Packages.gz; do echo " $(md5sum "$f" | cut -d' ' -f1) $(stat -c %s "$f") $f"; done
    echo "SHA256:"
    for f in Packages Packages.gz; do echo " $(sha256sum "$f" | cut -d' ' -f1) $(stat -c %s "$f") $f"; done
  } >Release
)

# A throw-away signing key, made fresh for every build.
export GNUPGHOME="$work/gnupg"
install -d -m 0700 "$GNUPGHOME"
gpg --batch --quiet --passphrase '' --quick-gen-key 'herd lab repository signing key <lab@herd.invalid>' \
  ed25519 sign 1y 2>/dev/null
gpg --batch --quiet --armor --export >"$out/gpgkey"
gpg --batch --quiet --yes --clearsign -o "$out/InRelease" "$out/Release"
gpg --batch --quiet --yes --armor --detach-sign -o "$out/Release.gpg" "$out/Release"
echo "built herd lab stand-in repository in $out: $(cd "$out" && ls ./*.deb | tr '\n' ' ')"
