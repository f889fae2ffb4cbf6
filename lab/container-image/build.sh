#!/usr/bin/env bash
# herd LAB: build the local image that lab hosts run in ollama_mode=container, in place of ollama/ollama.
# The lab's nested Docker engines cannot pull, so the image is made on the lab host itself from the host's own
# python3 (its binary, standard library and shared libraries, nothing else) plus herd's Ollama API emulator
# installed as /bin/ollama, laid out like the official image: ENTRYPOINT ["/bin/ollama"], CMD ["serve"],
# models under /root/.ollama/models. It is NOT Ollama. Lab only: never push it, never run it on a real host.
#
# Usage (on a lab host with python3 and a running Docker engine):
#   build.sh EMULATOR TAG      e.g. build.sh /usr/local/lib/herd-lab/ollama_emulator.py herd-lab/ollama:0.34.2-herd-emulator
# Prints "built TAG" when it imported a new image, "up to date TAG" when TAG already holds this emulator.
set -euo pipefail

emulator=${1:?usage: build.sh EMULATOR TAG}
tag=${2:?usage: build.sh EMULATOR TAG}
here=$(cd "$(dirname "$0")" && pwd)
# The image is rebuilt when the emulator or this script changes.
source_sum=$(cat "$emulator" "$here/build.sh" | sha256sum | cut -d' ' -f1)

current=$(docker image inspect --format '{{ index .Config.Labels "herd.lab.source" }}' "$tag" 2>/dev/null || true)
if [[ "$current" == "$source_sum" ]]; then
  echo "up to date $tag"
  exit 0
fi

python=$(readlink -f /usr/bin/python3)
pyver=$(basename "$python")
stage=$(mktemp -d "${TMPDIR:-/tmp}/herd-lab-image.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# Merged-/usr layout, as Debian 12 and the official image have it.
install -d -m 0755 "$stage/usr/bin" "$stage/usr/lib" "$stage/usr/lib64" "$stage/etc" "$stage/root/.ollama/models"
install -d -m 1777 "$stage/tmp"
ln -s usr/bin "$stage/bin"
ln -s usr/lib "$stage/lib"
ln -s usr/lib64 "$stage/lib64"

install -m 0755 "$python" "$stage/usr/bin/$pyver"
ln -s "$pyver" "$stage/usr/bin/python3"
install -m 0755 /usr/bin/env "$stage/usr/bin/env"
install -m 0755 "$emulator" "$stage/usr/bin/ollama"
tar -C / --exclude='__pycache__' --exclude="usr/lib/$pyver/test" --exclude="usr/lib/$pyver/idlelib" \
  --exclude="usr/lib/$pyver/tkinter" --exclude="usr/lib/$pyver/ensurepip" --exclude="usr/lib/$pyver/lib2to3" \
  -cf - "usr/lib/$pyver" | tar -C "$stage" -xf -

# Every shared library the interpreter and its extension modules load, at its canonical path.
for obj in "$python" /usr/bin/env "/usr/lib/$pyver"/lib-dynload/*.so; do
  ldd "$obj" 2>/dev/null | awk '/=> \// {print $3} /^\t\// {print $1}'
done | sort -u | while read -r lib; do
  dir=$(readlink -f "$(dirname "$lib")")
  install -d -m 0755 "$stage$dir"
  cp -L "$lib" "$stage$dir/$(basename "$lib")"
done

printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' >"$stage/etc/passwd"
printf 'root:x:0:\n' >"$stage/etc/group"
printf 'hosts: files dns\n' >"$stage/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$stage/etc/hosts"

tar --sort=name --numeric-owner --owner=0 --group=0 -C "$stage" -cf - . | docker import \
  -c 'ENTRYPOINT ["/bin/ollama"]' \
  -c 'CMD ["serve"]' \
  -c 'ENV OLLAMA_HOST=0.0.0.0:11434' \
  -c 'ENV PATH=/usr/bin' \
  -c 'EXPOSE 11434' \
  -c "LABEL herd.lab.source=$source_sum" \
  -c 'LABEL herd.lab.standin="herd Ollama API emulator, NOT Ollama"' \
  - "$tag" >/dev/null
echo "built $tag"
