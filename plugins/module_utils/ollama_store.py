# Copyright: herd contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An Ollama model store on disk: its manifests and blob files. Standard library only.

One rule for the modules that read or write a store (ollama_model_info, ollama_model_sync): what a valid manifest
is, how a digest names its blob file, where herd keeps partial copies, and the owner and group accounts they set.
"""

from __future__ import annotations

import grp
import json
import pwd
import re

DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
BLOB_FILE_RE = re.compile(r"^sha256-([0-9a-f]{64})$")
PARTIAL_DIR = ".herd-partial"


def parse_manifest(text):
    """Return the blobs a manifest references as a list of {digest, size, media_type}, config first.

    Raises ValueError when the text is not an Ollama manifest with valid sha256 digests and sizes.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    entries = []
    config = data.get("config")
    if config:
        entries.append(config)
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError("no layers")
    entries.extend(layers)
    blobs = []
    seen = set()
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError("a layer is not an object")
        digest = entry.get("digest")
        size = entry.get("size")
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise ValueError(f"bad digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"bad size {size!r} for {digest}")
        if digest in seen:
            continue
        seen.add(digest)
        blobs.append({"digest": digest, "size": size, "media_type": entry.get("mediaType", "")})
    return blobs


def blob_filename(digest):
    return digest.replace(":", "-", 1)


def digest_from_filename(name):
    m = BLOB_FILE_RE.match(name)
    return f"sha256:{m.group(1)}" if m else None


def account_id(value, kind):
    """The numeric id of an owner (kind "owner") or group (kind "group") given by name or number; -1 for none.
    Raises KeyError naming the account when the host has no such one."""
    if value in (None, ""):
        return -1
    if str(value).isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid if kind == "owner" else grp.getgrnam(value).gr_gid
    except KeyError:
        raise KeyError(f"{kind} {value!r} does not exist on this host") from None
