"""Make herd's plugins/module_utils importable as ansible.module_utils.<name>, as ansible.cfg does for modules, and
hold the one loader of herd's files that are not importable packages (plugins, role files, tools, benchmarks).

Test files import it as `from herd_testing import load_module, REPO` (this conftest, under a name of its own: every
folder's conftest.py is imported as `conftest`)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
import sys
import threading

import ansible.module_utils
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def load_module(relative_path, name):
    """Import the file REPO/relative_path (or an absolute path) as module `name`, once (cached in sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    path = REPO / relative_path
    folder = str(path.parent)
    if folder not in sys.path:  # a file importing its neighbours (benchmarks/, tools/)
        sys.path.append(folder)
    loader = importlib.machinery.SourceFileLoader(name, str(path))  # any file name (lab/standins/nvidia-smi)
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_server():
    """run_server(server): serve_forever on a daemon thread, and the server back; every server started is shut down
    and closed at teardown."""
    servers = []

    def run(server):
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield run
    for server in servers:
        server.shutdown()
        server.server_close()


sys.modules.setdefault("herd_testing", sys.modules[__name__])

MODULE_UTILS = str(pathlib.Path(__file__).resolve().parents[2] / "plugins" / "module_utils")
if MODULE_UTILS not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(MODULE_UTILS)

# herd's service library (role herd_service), importable as herd-exporter and herd-guard import it on the hosts
# (PYTHONPATH=/usr/local/lib/herd in their units).
import sys  # noqa: E402

SERVICE_LIB = str(pathlib.Path(__file__).resolve().parents[2] / "roles" / "herd_service" / "files")
if SERVICE_LIB not in sys.path:
    sys.path.insert(0, SERVICE_LIB)
