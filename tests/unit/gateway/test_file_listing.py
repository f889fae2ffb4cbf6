"""gateway_file_listing: the controller's side of role gateway's Lua module check is what `find ... -printf
'%p %m %u:%g ' -exec sha256sum {} ;` prints for the same files installed with that mode and owner, so that an
unchanged host copies nothing and any change (content, mode, owner, a missing file) copies them again."""

import os
import shutil
import subprocess

from conftest import ROLE

FIND = ["-type", "f", "-name", "*.lua", "-printf", "%p %m %u:%g ", "-exec", "sha256sum", "{}", ";"]


def _host_listing(dest):
    out = subprocess.run(["find", str(dest), *FIND], capture_output=True, text=True, check=False).stdout
    return sorted(out.splitlines())


def test_an_installed_copy_lists_the_same_and_any_change_differs(gw, tmp_path):
    src = os.path.join(ROLE, "files")
    dest = tmp_path / "lua"
    dest.mkdir()
    shutil.copy(os.path.join(src, "herd_gateway.lua"), dest)
    shutil.copytree(os.path.join(src, "herd_gateway"), dest / "herd_gateway")
    for path in dest.rglob("*.lua"):
        path.chmod(0o644)
    owner = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True, check=True).stdout.strip()
    wanted = gw.gateway_file_listing(src, str(dest), owner=f"{owner}:{group}")
    assert len(wanted) == 1 + len(os.listdir(os.path.join(src, "herd_gateway")))
    assert _host_listing(dest) == wanted
    (dest / "herd_gateway" / "keys.lua").chmod(0o600)
    assert _host_listing(dest) != wanted
    (dest / "herd_gateway" / "keys.lua").chmod(0o644)
    with open(dest / "herd_gateway" / "slots.lua", "a", encoding="utf-8") as handle:
        handle.write("-- changed on the host\n")
    assert _host_listing(dest) != wanted
    shutil.rmtree(dest / "herd_gateway")
    assert _host_listing(dest) != wanted
    assert _host_listing(tmp_path / "missing") == [] != wanted
