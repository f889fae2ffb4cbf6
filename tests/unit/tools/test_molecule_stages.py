"""scripts/molecule_stages.py: the make test summary of a scenario's time-stamped log (its stages, its slowest
tests), on a log in the shape the Makefile's molecule-% rule writes."""

from herd_testing import load_module

ms = load_module("scripts/molecule_stages.py", "molecule_stages")

LOG = """\
10:00:00 INFO     default ➜ create: Executing
10:00:30 INFO     default ➜ create: Executed: Successful
10:00:31 INFO     default ➜ converge: Executing
10:04:01 INFO     default ➜ converge: Executed: Successful
10:04:02 INFO     default ➜ verify: Executing
10:20:00 ============================= slowest durations ==============================
10:20:00 312.51s call     molecule/default/tests/test_rolling_by_instance.py::test_rolling[ansible://herd-mol-aio]
10:20:00 9.02s setup    molecule/default/tests/test_default.py::test_first[ansible://herd-mol-aio]
10:20:00 40.00s call     molecule/default/tests/test_links.py::test_links[ansible://herd-mol-aio]
10:20:01 INFO     default ➜ verify: Executed: Successful
"""


def test_stages_in_order_with_their_seconds():
    assert ms.stages(LOG.splitlines()) == [("create", 30), ("converge", 210), ("verify", 959)]


def test_slowest_longest_first_named_by_file_test_and_host():
    slow = ms.slowest(LOG.splitlines(), count=2)
    assert slow == [(312.51, "test_rolling_by_instance.py::test_rolling[herd-mol-aio]", "call"),
                    (40.0, "test_links.py::test_links[herd-mol-aio]", "call")]


def test_main_prints_both_lines(tmp_path, capsys):
    log = tmp_path / "default.log"
    log.write_text(LOG)
    ms.main(str(log))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "    stages: create 30 s, converge 210 s, verify 959 s"
    assert out[1].startswith("    slowest: test_rolling_by_instance.py::test_rolling[herd-mol-aio] 313 s, ")
    assert "test_default.py::test_first[herd-mol-aio] (setup) 9 s" in out[1]


def test_a_log_without_durations_prints_only_the_stages(tmp_path, capsys):
    log = tmp_path / "x.log"
    log.write_text("\n".join(LOG.splitlines()[:2]) + "\n")
    ms.main(str(log))
    assert capsys.readouterr().out.splitlines() == ["    stages: create 30 s"]


def test_lines_folded_by_molecules_console_are_joined():
    folded = [
        "18:55:40   │ ============================= slowest 10 durations",
        "18:55:40   │ 347.36s call    ",
        "18:55:40   │   work/run/molecule/multihost/tests/test_multihost.py::test_rollin",
        "18:55:40   │   g_redeploy[ansible://herd-mh-gw]",
        "18:55:40   │ 54.42s call    ",
        "18:55:40   │   work/run/molecule/multihost/tests/test_faults.py::test_stopped",
        "18:55:40   │ (4 durations < 5s hidden.)",
    ]
    assert ms.slowest(folded) == [(347.36, "test_multihost.py::test_rolling_redeploy[herd-mh-gw]", "call"),
                                  (54.42, "test_faults.py::test_stopped", "call")]
