"""The folder rule (plugins/filter/ollama_plan.py path_problem / ollama_path_errors): role ollama's preflight
refuses an install or data folder that is not herd's own, before any host changes (badinput runs the same cases
through site.yml)."""

import pytest

DEFAULTS = {"ollama_install_dir": "/opt/ollama", "ollama_data_dir": "/var/lib/herd"}


def errors(planner, **paths):
    return planner.ollama_path_errors({**DEFAULTS, **paths})


def test_the_defaults_and_other_own_folders_pass(planner):
    assert errors(planner) == []
    assert errors(planner, ollama_install_dir="/srv/herd/ollama/", ollama_data_dir="/data/herd") == []
    assert errors(planner, ollama_data_dir="/home/herd/data") == []


@pytest.mark.parametrize(
    "path",
    ["/", "/etc", "/usr", "/opt", "/opt/", "/usr/local", "/usr/local/bin", "/var", "/var/lib", "/home", "/srv",
     "/tmp", "/root", "/var/lib/docker"],
)
@pytest.mark.parametrize("var", ["ollama_install_dir", "ollama_data_dir"])
def test_a_system_folder_is_refused_naming_the_variable_and_the_fix(planner, var, path):
    (msg,) = errors(planner, **{var: path})
    assert msg.startswith(f"{var}: ") and "system folder" in msg and "Fix: use a folder of herd's own" in msg


@pytest.mark.parametrize(
    "path,words",
    [
        ("/home/alice", "a user's home"),
        ("/proc/herd", "below /proc"),
        ("/run/herd", "below /run"),
        ("opt/ollama", "not an absolute path"),
        ("/opt/my ollama", "not an absolute path"),
        ("/opt/../etc", "not a plain path"),
        ("/opt//ollama", "not a plain path"),
        ("/opt/./ollama", "not a plain path"),
    ],
)
def test_homes_virtual_trees_and_unclean_paths_are_refused(planner, path, words):
    (msg,) = errors(planner, ollama_install_dir=path)
    assert msg.startswith("ollama_install_dir: ") and words in msg and "Fix:" in msg


def test_one_folder_for_both_is_refused(planner):
    (msg,) = errors(planner, ollama_install_dir="/srv/herd", ollama_data_dir="/srv/herd/")
    assert "ollama_install_dir and ollama_data_dir: both are '/srv/herd'" in msg and "Fix: give each its own" in msg


@pytest.mark.parametrize(
    "install,data,outer,inner",
    [
        ("/srv/herd", "/srv/herd/data", "ollama_install_dir", "ollama_data_dir"),
        ("/srv/herd/ollama", "/srv/herd", "ollama_data_dir", "ollama_install_dir"),
    ],
)
def test_a_parent_of_another_herd_path_is_refused(planner, install, data, outer, inner):
    (msg,) = errors(planner, ollama_install_dir=install, ollama_data_dir=data)
    assert msg.startswith(f"{outer}: ") and f"holds {inner}" in msg and "side by side" in msg


@pytest.mark.parametrize("path", ["/etc/herd", "/etc/herd/ollama", "/etc/herd/ollama/x", "/usr/local/bin/ollama"])
def test_folders_overlapping_what_herd_always_writes_are_refused(planner, path):
    (msg,) = errors(planner, ollama_data_dir=path)
    assert msg.startswith("ollama_data_dir: ") and "which herd manages on its own" in msg


def test_the_planner_applies_the_same_rule_to_ollama_data_dir(planner):
    assert planner.path_problem("/var/lib") and planner.path_problem("/var/lib/herd") == ""
