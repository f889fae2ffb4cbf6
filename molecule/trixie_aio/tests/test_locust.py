"""A short headless Locust run of tools/locustfile.py against the trixie all-in-one gateway: requests ran, none failed.

Locust comes from PyPI (requirements-locust.txt, pinned) into its own venv on the controller, kept between runs
in ~/.cache/herd (HERD_LOCUST_VENV to choose another place) and rebuilt only when the requirements change.
HERD_SKIP_LOCUST=1 skips this test (machines without PyPI). Bounded: 2 users for 10 s, each request 30 s at most.
"""

import csv
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "molecule"))
from herd_measure import measured  # noqa: E402

PROJECT = pathlib.Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
REQUIREMENTS = PROJECT / "requirements-locust.txt"
HOST = "herd-t13-aio"
USERS, SECONDS = 2, 10

testinfra_hosts = [f"ansible://{HOST}"]


def _locust_venv():
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    venv = pathlib.Path(os.environ.get("HERD_LOCUST_VENV", cache / "herd" / f"locust-{digest}"))
    stamp = venv / ".herd-requirements.sha256"
    if not (stamp.is_file() and stamp.read_text().strip() == digest):
        subprocess.run(["python3", "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(REQUIREMENTS)], check=True, timeout=600)
        stamp.write_text(digest + "\n")
    return venv


def _gateway_address():
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", HOST],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return out.stdout.split()[0]


@pytest.mark.skipif(os.environ.get("HERD_SKIP_LOCUST") == "1", reason="HERD_SKIP_LOCUST=1")
def test_locust_run_through_the_gateway_fails_no_request(host, tmp_path):
    venv = _locust_venv()
    env = dict(os.environ, HERD_LOCUST_MODEL="herd-tiny:1b", HERD_LOCUST_NUM_PREDICT="8", HERD_LOCUST_PROMPT_WORDS="8")
    proc = subprocess.run(
        [str(venv / "bin" / "locust"), "-f", str(PROJECT / "tools" / "locustfile.py"),
         "--host", f"http://{_gateway_address()}", "--headless", "-u", str(USERS), "-r", str(USERS),
         "-t", f"{SECONDS}s", "--stop-timeout", "30", "--csv", str(tmp_path / "run"), "--only-summary"],
        capture_output=True, text=True, timeout=SECONDS + 90, env=env, cwd=tmp_path, check=False,
    )
    with open(tmp_path / "run_stats.csv", encoding="utf-8") as fh:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}
    post = {name: int(r["Request Count"]) for (kind, name), r in rows.items() if kind == "POST"}
    failures = sum(int(r["Failure Count"]) for r in rows.values() if r["Name"] != "Aggregated")
    total = sum(post.values())
    measured(f"trixie_aio locust {USERS} users {SECONDS} s: {total} requests "
             f"({', '.join(f'{k} {v}' for k, v in sorted(post.items()))}), {failures} failed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert total >= 5, proc.stderr[-3000:]
    assert post.get("/api/generate", 0) > 0 and post.get("/api/chat", 0) > 0, post
    assert failures == 0, proc.stderr[-3000:]
    # Every request was served by one of the instances (the locustfile counts X-Herd-Upstream).
    assert "127.0.0.1:11434" in proc.stdout and "127.0.0.1:11435" in proc.stdout, proc.stdout[-2000:]
