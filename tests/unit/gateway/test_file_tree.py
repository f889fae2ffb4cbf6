"""gateway_file_tree: what role gateway hands herd.herd.file_set is every Lua module of the role by its installed
path (herd_gateway.lua and herd_gateway/*.lua), each one's text as in the role."""

import os

from conftest import ROLE


def test_the_tree_is_every_lua_module_of_the_role(gw):
    src = os.path.join(ROLE, "files")
    tree = gw.gateway_file_tree(src)
    wanted = {"herd_gateway.lua"} | {f"herd_gateway/{name}" for name in os.listdir(os.path.join(src, "herd_gateway"))
                                     if name.endswith(".lua")}
    assert set(tree) == wanted and len(tree) > 10
    assert list(tree) == sorted(tree)
    with open(os.path.join(src, "herd_gateway", "slots.lua"), encoding="utf-8") as handle:
        assert tree["herd_gateway/slots.lua"] == handle.read()
    assert not any(name.endswith(("drain", "check")) for name in tree)  # the role's other files are not modules
