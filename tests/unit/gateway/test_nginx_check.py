"""roles/gateway/files/herd-nginx-check: the whole config is tested with the candidate in place, nothing lands."""

import os
import subprocess
import sys

import pytest
from conftest import NGINX, ROLE

CHECK = os.path.join(ROLE, "files", "herd-nginx-check")


@pytest.fixture()
def conf_root(tmp_path):
    if NGINX is None:
        pytest.skip("nginx is not installed here")
    root = tmp_path / "nginx"
    (root / "conf.d").mkdir(parents=True)
    (root / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n"
        f"  include {root}/conf.d/*.conf;\n}}\n"
    )
    # Another file already in place: the candidate must be checked together with it.
    (root / "conf.d" / "other.conf").write_text("upstream taken { server 127.0.0.1:1; }\n")
    (root / "conf.d" / "gw.conf").write_text("# old\n")
    return root


def run_check(root, candidate_text, tmp_path):
    candidate = tmp_path / "candidate"
    candidate.write_text(candidate_text)
    env = dict(os.environ, HERD_NGINX_CONF_ROOT=str(root), HERD_NGINX_BIN=NGINX)
    return subprocess.run([sys.executable, CHECK, str(root / "conf.d" / "gw.conf"), str(candidate)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False)


def test_good_candidate_passes_and_changes_nothing(conf_root, tmp_path):
    result = run_check(conf_root, "upstream mine { server 127.0.0.1:2; }\n", tmp_path)
    assert result.returncode == 0, result.stdout
    assert (conf_root / "conf.d" / "gw.conf").read_text() == "# old\n"


def test_candidate_clashing_with_another_file_fails_with_nginx_message(conf_root, tmp_path):
    result = run_check(conf_root, "upstream taken { server 127.0.0.1:2; }\n", tmp_path)
    assert result.returncode != 0
    assert 'duplicate upstream "taken"' in result.stdout
    # Paths in the message are the real ones, not the temporary copy.
    assert str(conf_root / "conf.d") in result.stdout and "herd-nginx-check." not in result.stdout
    assert (conf_root / "conf.d" / "gw.conf").read_text() == "# old\n"


def test_dest_outside_the_tree_is_refused(conf_root, tmp_path):
    env = dict(os.environ, HERD_NGINX_CONF_ROOT=str(conf_root), HERD_NGINX_BIN=NGINX)
    result = subprocess.run([sys.executable, CHECK, "/etc/passwd", "/dev/null"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, check=False)
    assert result.returncode == 2 and "is not under" in result.stdout
