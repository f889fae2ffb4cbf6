"""Seed 004's OLLAMA_KEEP_ALIVE=15s deploys and smokes cleanly: readiness is "loads and answers", not residency.

Runs last in the scenario (after the rolling test): it redeploys the instances with keep_alive 15s.
"""

import json
import os
import re
import subprocess
import time

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
GPUS = 4
BASE_PORT = 11434


def _playbook(*args, timeout=600):
    # JSON result format: one table row per output line (the YAML format folds long rows).
    run = subprocess.run(["ansible-playbook", "-i", INVENTORY, *args], capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, ANSIBLE_CALLBACK_RESULT_FORMAT="json"))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return run.stdout


def test_keep_alive_15s_deploys_smokes_and_reports_unloaded_models(host):
    extra = json.dumps({"ollama_keep_alive": "15s"})
    _playbook(f"{PROJECT}/site.yml", "--tags", "ollama", "-e", extra)
    for i in range(GPUS):
        assert 'OLLAMA_KEEP_ALIVE="15s"' in host.file(f"/etc/herd/ollama/{i}.env").content_string
    # Idle models unload after 15 s (bounded wait: 40 s at most).
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        loaded = [json.loads(host.check_output(f"curl -fsS http://127.0.0.1:{BASE_PORT + i}/api/ps"))["models"]
                  for i in range(GPUS)]
        if not any(loaded):
            break
        time.sleep(2)
    assert not any(loaded), loaded
    # Smoke passes with nothing resident: every model on every instance loads and answers.
    out = _playbook(f"{PROJECT}/playbooks/smoke.yml", "-e", extra)
    assert "models may unload: keep_alive 15s" in out
    # The status table says, per model, whether it is resident now (the smoke loaded them again; they unload
    # 15 s after it, so either word may show).
    out = _playbook(f"{PROJECT}/playbooks/status.yml", "-e", extra)
    rows = [ln for ln in out.splitlines() if '"ollama@' in ln]
    assert len(rows) == GPUS, out[-3000:]
    for row in rows:
        assert " ok " in row and re.search(r"herd-tiny:1b (resident|unloaded), herd-small:latest (resident|unloaded)", row)
