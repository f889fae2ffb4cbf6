#!/usr/bin/python
# Copyright: herd contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: file_set
short_description: Install a set of files under one folder in one module run
description:
  - Writes every file of O(files) (a path relative to O(dest) and its content) under O(dest) with O(mode), O(owner) and
    O(group), creating the folders on the way with O(directory_mode); a file is written only when its content, mode
    or owner differs, each one atomically (a temporary file in its folder, then a rename over the old one).
  - With O(prune), files under O(dest) whose names end with O(prune_suffix) and that are not in O(files) are removed.
  - One module run for the whole set; M(ansible.builtin.copy) of a folder runs a remote stat and a copy for each
    file (about 18 s for role gateway's 20 Lua modules; this module, well under a second).
  - Never follows a symbolic link under O(dest) (a link where a file or folder of the set belongs is replaced, never
    written through), and refuses a O(dest) that is a link; run as root, it trusts no path below O(dest) it did not
    write.
version_added: "1.0.0"
author:
  - herd contributors
options:
  dest:
    description: The folder the paths of O(files) are relative to; created when missing.
    type: path
    required: true
  files:
    description:
      - Relative path (no C(..), not absolute) -> the file's content, as O(encoding) says.
      - M(herd.herd.file_tree) reads a controller folder into this shape.
    type: dict
    required: true
  encoding:
    description:
      - C(utf-8) - each value is the file's text, written as UTF-8.
      - C(base64) - each value is the file's bytes in base64 (files that are not text, such as model blobs).
    type: str
    choices: [utf-8, base64]
    default: utf-8
  mode:
    description: Mode of every file, octal.
    type: str
    default: "0644"
  directory_mode:
    description: Mode of the folders the module creates, octal (folders that exist keep theirs).
    type: str
    default: "0755"
  owner:
    description: Owner of every file and created folder.
    type: str
    default: root
  group:
    description: Group of every file and created folder.
    type: str
    default: root
  prune:
    description: Remove files under O(dest) that end with O(prune_suffix) and are not in O(files).
    type: bool
    default: false
  prune_suffix:
    description: Which files O(prune) may remove.
    type: str
    default: .lua
notes:
  - Supports check mode (reports what it would write or remove) and diff mode (the paths written and removed).
attributes:
  check_mode:
    support: full
    description: Reports the files it would write or remove; writes nothing.
  diff_mode:
    support: partial
    description: Lists the paths written and removed, not their contents.
"""

EXAMPLES = r"""
- name: Install the gateway's Lua modules
  herd.herd.file_set:
    dest: /usr/local/share/herd/lua
    files: "{{ (role_path ~ '/files') | herd.herd.file_tree('.lua') }}"
    prune: true
"""

RETURN = r"""
written:
  description: Paths (relative to O(dest)) written or whose mode or owner was set, sorted.
  returned: always
  type: list
  elements: str
removed:
  description: Paths removed by O(prune), sorted.
  returned: always
  type: list
  elements: str
"""

import base64  # noqa: E402
import binascii  # noqa: E402
import grp  # noqa: E402
import os  # noqa: E402
import pwd  # noqa: E402
import stat  # noqa: E402
import tempfile  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402


def _relative_ok(rel):
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _ensure_dir(path, mode, uid, gid, check):
    """path exists as a real folder (a link or file there is replaced); returns True when it was created."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        return False
    if check:
        return True
    if st is not None:
        os.unlink(path)  # a link or a file where a folder of the set belongs: removed, never followed
    os.mkdir(path, mode)
    os.chown(path, uid, gid)
    os.chmod(path, mode)  # the folder just made (mkdir's mode is masked by the umask)
    return True


def _same(path, data, mode, uid, gid):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # missing, a link (ELOOP) or unreadable: written again
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != mode or (st.st_uid, st.st_gid) != (uid, gid):
            return False
        if st.st_size != len(data):
            return False
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks) == data
    finally:
        os.close(fd)


def _write(path, data, mode, uid, gid):
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".file_set.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchown(handle.fileno(), uid, gid)
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # a link at path is replaced itself, its target untouched
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dest=dict(type="path", required=True),
            files=dict(type="dict", required=True),
            encoding=dict(type="str", default="utf-8", choices=["utf-8", "base64"]),
            mode=dict(type="str", default="0644"),
            directory_mode=dict(type="str", default="0755"),
            owner=dict(type="str", default="root"),
            group=dict(type="str", default="root"),
            prune=dict(type="bool", default=False),
            prune_suffix=dict(type="str", default=".lua"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    dest = os.path.normpath(p["dest"])
    check = module.check_mode
    try:
        mode = int(p["mode"], 8)
        dir_mode = int(p["directory_mode"], 8)
    except ValueError:
        module.fail_json(msg=f"mode={p['mode']!r} and directory_mode={p['directory_mode']!r} must be octal, such as 0644")
    try:
        uid = pwd.getpwnam(p["owner"]).pw_uid
        gid = grp.getgrnam(p["group"]).gr_gid
    except KeyError as exc:
        module.fail_json(msg=f"owner {p['owner']!r} or group {p['group']!r} does not exist on the host: {exc}")
    files = {}
    for rel, text in p["files"].items():
        rel = str(rel)
        if not _relative_ok(rel):
            module.fail_json(msg=f"files: {rel!r} is not a plain relative path (no leading /, no . or .. parts)")
        text = "" if text is None else str(text)
        if p["encoding"] == "base64":
            try:
                files[rel] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                module.fail_json(msg=f"files: {rel!r} is not valid base64 (encoding=base64): {exc}")
        else:
            files[rel] = text.encode("utf-8")
    if os.path.islink(dest):
        module.fail_json(msg=f"dest {dest} is a symbolic link: refusing to write through it (remove the link)")

    written, removed = [], []
    parent = os.path.dirname(dest)
    if not os.path.isdir(parent) and not check:
        os.makedirs(parent, dir_mode)
    created_dest = _ensure_dir(dest, dir_mode, uid, gid, check)
    for rel in sorted(files):
        path = os.path.join(dest, rel)
        # every folder between dest and the file: a real folder, never a link
        here = dest
        for part in rel.split("/")[:-1]:
            here = os.path.join(here, part)
            _ensure_dir(here, dir_mode, uid, gid, check)
        if not _same(path, files[rel], mode, uid, gid):  # a file not there yet (check mode, new dest) differs too
            written.append(rel)
            if not check:
                _write(path, files[rel], mode, uid, gid)
    if p["prune"] and os.path.isdir(dest):  # dest is no link: refused above
        for folder, dirs, names in os.walk(dest, followlinks=False):
            for name in names:
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, dest)
                if name.endswith(p["prune_suffix"]) and rel not in files:
                    removed.append(rel)
                    if not check:
                        os.unlink(full)
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    removed.sort()
    changed = bool(written or removed or created_dest)
    result = dict(changed=changed, written=written, removed=removed, dest=dest)
    if module._diff and changed:
        result["diff"] = dict(before_header=dest, after_header=dest,
                              before="".join(f"{r}\n" for r in sorted(set(written) | set(removed))),
                              after="".join(f"{r}\n" for r in written))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
