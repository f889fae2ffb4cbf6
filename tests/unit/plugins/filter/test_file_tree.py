"""herd.herd.file_tree (plugins/filter/file_tree.py): what roles hand herd.herd.file_set. For role gateway, every
Lua module of the role by its installed path (herd_gateway.lua and herd_gateway/*.lua), each one's text as in the
role; for role lab_standins, the lab registry's files in base64, bytes unchanged."""

import base64
import os

import pytest
from ansible.errors import AnsibleFilterError
from herd_testing import REPO, load_module

ft = load_module("plugins/filter/file_tree.py", "file_tree")
SRC = str(REPO / "roles" / "gateway" / "files")


def test_the_gateway_tree_is_every_lua_module_of_the_role():
    tree = ft.file_tree(SRC, ".lua")
    wanted = {"herd_gateway.lua"} | {f"herd_gateway/{name}" for name in os.listdir(os.path.join(SRC, "herd_gateway"))
                                     if name.endswith(".lua")}
    assert set(tree) == wanted and len(tree) > 10
    assert list(tree) == sorted(tree)
    with open(os.path.join(SRC, "herd_gateway", "slots.lua"), encoding="utf-8") as handle:
        assert tree["herd_gateway/slots.lua"] == handle.read()
    assert not any(name.endswith(("drain", "check")) for name in tree)  # the role's other files are not modules


def test_base64_keeps_bytes_that_are_not_text(tmp_path):
    (tmp_path / "blobs").mkdir()
    blob = bytes(range(256))
    (tmp_path / "blobs" / "sha256-x").write_bytes(blob)
    (tmp_path / "m.json").write_text("{}\n")
    tree = ft.file_tree(str(tmp_path), encoding="base64")
    assert list(tree) == ["blobs/sha256-x", "m.json"]
    assert base64.b64decode(tree["blobs/sha256-x"]) == blob
    # read as text, the blob is refused with the way out named
    with pytest.raises(AnsibleFilterError, match="not UTF-8 text.*encoding='base64'"):
        ft.file_tree(str(tmp_path))


def test_a_missing_folder_or_unknown_encoding_is_refused(tmp_path):
    with pytest.raises(AnsibleFilterError, match="is not a folder on the controller"):
        ft.file_tree(str(tmp_path / "missing"))
    with pytest.raises(AnsibleFilterError, match="encoding='latin-1' is not one of utf-8, base64"):
        ft.file_tree(str(tmp_path), encoding="latin-1")
