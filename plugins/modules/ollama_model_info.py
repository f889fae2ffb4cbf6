#!/usr/bin/python
# Copyright: herd contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

# Ansible's module layout puts DOCUMENTATION, EXAMPLES and RETURN before the imports.
# ruff: noqa: E402

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ollama_model_info
short_description: List the models in an Ollama models directory and check that their blobs are whole
description:
  - Reads an Ollama models directory (an instance's C(OLLAMA_MODELS) or herd's host-level store) and returns
    every model's manifest ID, blob digests and sizes, and whether every blob is present with the right size.
  - With O(verify=true) it also computes the sha256 of every blob and compares it with the blob's name.
  - Read-only; never changes anything.
version_added: "0.1.0"
author:
  - herd contributors
options:
  path:
    description:
      - The models directory (holding C(manifests/) and C(blobs/)). A missing directory yields no models.
    type: path
    required: true
  models:
    description:
      - Only report these models (names as Ollama parses them, for example C(qwen2.5:7b)).
      - Names listed here but absent from O(path) are reported in RV(missing).
    type: list
    elements: str
    default: []
  verify:
    description:
      - Compute the sha256 of every blob of the reported models (reads every byte).
    type: bool
    default: false
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode).
    support: none
seealso:
  - module: ollama_model_sync
"""

EXAMPLES = r"""
- name: Read the models of instance 0
  ollama_model_info:
    path: /var/lib/herd/instances/0/models
  register: __ollama_models

- name: Audit the store's copy of one model
  ollama_model_info:
    path: /var/lib/herd/store
    models: [qwen2.5:7b]
    verify: true
  register: __ollama_store_audit
  failed_when: not __ollama_store_audit.ok
"""

RETURN = r"""
models:
  description: One entry per manifest found (or per listed model found).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Fully qualified name (C(host/namespace/model:tag)).
      type: str
    manifest:
      description: Manifest path relative to O(path).
      type: str
    id:
      description: sha256 of the manifest (its first 12 hex digits are the ID C(ollama list) shows).
      type: str
    size:
      description: Total size of the model's blobs in bytes, as its manifest declares.
      type: int
    complete:
      description: Every blob is present with the declared size.
      type: bool
    verified:
      description: Every blob hashes to its digest (null unless O(verify=true)).
      type: bool
    error:
      description: Why the manifest cannot be read (null when it can).
      type: str
    blobs:
      description: Per blob - digest, size, present, size_ok and (with O(verify=true)) verified.
      type: list
      elements: dict
missing:
  description: Names from O(models) that have no manifest in O(path).
  returned: always
  type: list
  elements: str
orphan_blobs:
  description: Blobs named C(sha256-<hex>) that no manifest in O(path) references (only when O(models) is empty).
  returned: always
  type: list
  elements: str
partial_files:
  description: Leftover temporary files of an interrupted C(ollama_model_sync) run in C(.herd-partial/).
  returned: always
  type: list
  elements: str
ok:
  description: True when no listed model is missing and every reported model is complete (and verified,
    with O(verify=true)).
  returned: always
  type: bool
"""

import hashlib
import os

from ansible.module_utils.basic import AnsibleModule

# The collection's path when herd runs as the collection herd.herd; ansible.cfg's module_utils folder in a checkout.
try:
    from ansible_collections.herd.herd.plugins.module_utils.ollama_names import full_name, name_from_parts, parse_name
    from ansible_collections.herd.herd.plugins.module_utils.ollama_store import (
        PARTIAL_DIR,
        blob_filename,
        digest_from_filename,
        parse_manifest,
    )
except ImportError:
    from ansible.module_utils.ollama_names import full_name, name_from_parts, parse_name
    from ansible.module_utils.ollama_store import PARTIAL_DIR, blob_filename, digest_from_filename, parse_manifest

CHUNK = 8 * 1024 * 1024


def qualify(name):
    """Fully qualified name with Ollama's defaults filled in, or None when the name is not valid."""
    try:
        return full_name(parse_name(name))
    except ValueError:
        return None


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def scan(path, wanted, verify):
    manifests_dir = os.path.join(path, "manifests")
    blobs_dir = os.path.join(path, "blobs")
    found = {}
    for root, _dirs, files in os.walk(manifests_dir):
        for fname in files:
            full = os.path.join(root, fname)
            name = name_from_parts(os.path.relpath(full, manifests_dir).split(os.sep))
            if name:
                found[name] = full
    wanted_q = {}
    for w in wanted:
        q = qualify(w)
        if q is None:
            raise ValueError(f"invalid model name {w!r}")
        wanted_q[q] = w
    names = sorted(found) if not wanted else sorted(q for q in wanted_q if q in found)
    missing = [wanted_q[q] for q in sorted(wanted_q) if q not in found]

    models, referenced, ok = [], set(), not missing
    for name in names:
        with open(found[name], "rb") as f:
            raw = f.read()
        model = {
            "name": name,
            "manifest": os.path.relpath(found[name], path),
            "id": "sha256:" + hashlib.sha256(raw).hexdigest(),
            "size": 0,
            "complete": False,
            "verified": None,
            "error": None,
            "blobs": [],
        }
        models.append(model)
        try:
            entries = parse_manifest(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            model["error"] = str(exc)
            ok = False
            continue
        complete, verified = True, True
        for blob in entries:
            digest, size = blob["digest"], blob["size"]
            referenced.add(digest)
            bpath = os.path.join(blobs_dir, blob_filename(digest))
            present = os.path.isfile(bpath)
            entry = {"digest": digest, "size": size, "present": present}
            entry["size_ok"] = present and os.path.getsize(bpath) == size
            complete &= entry["size_ok"]
            if verify:
                entry["verified"] = entry["size_ok"] and sha256_file(bpath) == digest
                verified &= entry["verified"]
            model["blobs"].append(entry)
            model["size"] += size
        model["complete"] = complete
        model["verified"] = verified if verify else None
        ok &= complete and (verified or not verify)

    orphans = []
    if not wanted and os.path.isdir(blobs_dir):
        for fname in sorted(os.listdir(blobs_dir)):
            digest = digest_from_filename(fname)
            if digest and digest not in referenced:
                orphans.append(digest)
    partial_dir = os.path.join(path, PARTIAL_DIR)
    partial = sorted(n for n in os.listdir(partial_dir) if n != ".lock") if os.path.isdir(partial_dir) else []
    return {"models": models, "missing": missing, "orphan_blobs": orphans, "partial_files": partial, "ok": ok}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            models=dict(type="list", elements="str", default=[]),
            verify=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    try:
        result = scan(module.params["path"], module.params["models"], module.params["verify"])
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg=f"cannot read {exc.filename}: {exc.strerror}")
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
