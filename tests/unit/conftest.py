"""Make herd's plugins/module_utils importable as ansible.module_utils.<name>, as ansible.cfg does for modules."""

from __future__ import annotations

import pathlib

import ansible.module_utils

MODULE_UTILS = str(pathlib.Path(__file__).resolve().parents[2] / "plugins" / "module_utils")
if MODULE_UTILS not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(MODULE_UTILS)

# herd's service library (role herd_service), importable as herd-exporter and herd-guard import it on the hosts
# (PYTHONPATH=/usr/local/lib/herd in their units).
import sys  # noqa: E402

SERVICE_LIB = str(pathlib.Path(__file__).resolve().parents[2] / "roles" / "herd_service" / "files")
if SERVICE_LIB not in sys.path:
    sys.path.insert(0, SERVICE_LIB)
