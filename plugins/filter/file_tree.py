# Copyright: herd contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""herd.herd.file_tree: every file of a controller folder by its relative path, for herd.herd.file_set (one module
run installs the whole set). Documentation: plugins/filter/file_tree.yml."""

from __future__ import annotations

import base64
import os

from ansible.errors import AnsibleFilterError

ENCODINGS = ("utf-8", "base64")


def file_tree(src_root, pattern="", encoding="utf-8"):
    """The files under src_root (a folder on the controller) whose names end with pattern, by path relative to
    src_root, sorted: each one's text (encoding utf-8) or its bytes in base64 (encoding base64, for files that are
    not text). Links to folders are not followed."""
    if encoding not in ENCODINGS:
        raise AnsibleFilterError(f"file_tree: encoding={encoding!r} is not one of {', '.join(ENCODINGS)}")
    if not os.path.isdir(src_root):
        raise AnsibleFilterError(f"file_tree: {src_root} is not a folder on the controller")
    tree = {}
    for folder, _dirs, names in os.walk(src_root):
        for name in names:
            if not name.endswith(pattern):
                continue
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                data = handle.read()
            rel = os.path.relpath(path, src_root)
            if encoding == "base64":
                tree[rel] = base64.b64encode(data).decode("ascii")
            else:
                try:
                    tree[rel] = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise AnsibleFilterError(f"file_tree: {path} is not UTF-8 text ({exc}); "
                                             "read it with encoding='base64'") from exc
    return dict(sorted(tree.items()))


class FilterModule:
    def filters(self):
        return {"file_tree": file_tree}
