# shellcheck shell=bash
# Shared by lab/build-ollama-archive.sh and lab/build-real-ollama.sh (sourced): an archive in Ollama's release
# layout with deterministic bytes, its checksum file, and the copy into the build folder only when bytes changed.

# pack_release SRC DIR ARCHIVE COMPRESSOR...: DIR/ARCHIVE from SRC's bin and lib (sorted, mtime 0, owner 0),
# compressed by the command COMPRESSOR... (stdin to stdout), and DIR/ARCHIVE.sha256 beside it.
pack_release() {
    local src=$1 dir=$2 archive=$3
    shift 3
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu \
        -C "$src" -cf - bin lib | "$@" > "$dir/$archive"
    (cd "$dir" && sha256sum "$archive" > "$archive.sha256")
}

# install_changed FROM TO FILE...: copy each FROM/FILE whose bytes differ from TO/FILE (mode 0644); succeeds when
# at least one was copied.
install_changed() {
    local from=$1 to=$2 file copied=1
    shift 2
    for file in "$@"; do
        if ! cmp -s "$from/$file" "$to/$file"; then
            install -m 0644 "$from/$file" "$to/$file"
            copied=0
        fi
    done
    return "$copied"
}
