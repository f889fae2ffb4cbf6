"""herd-guard's canaries against the emulator: a finite keep_alive still unloads idle models (seed 004's 15s).

A canary is a real request: without a keep_alive of its own it would restart the model's expiry timer, so a
canary every round would keep the model loaded forever. The control case shows that (the test can fail)."""

import os
import time

from standins_lab import load_module
from test_emulator_api import fast

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
guard = load_module("roles/guard/files/herd_guard.py", "herd_guard")
MODEL = "herd-tiny:1b"
CONFIG = {"interval": 0.25, "probe_timeout": 2, "canary_timeout": 5}


def _loaded(emu):
    return [m["name"] for m in emu.get_json("/api/ps")["models"]]


def _rounds(target, seconds):
    """Guard rounds every 0.25 s for at most `seconds` (bounded); the time the model was seen unloaded, or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        target.round()
        if target.canary_thread is not None:
            target.canary_thread.join(5)
        if not _loaded(target.emu):
            return time.monotonic() - start
        time.sleep(0.25)
    return None


def test_canaries_let_a_finite_keep_alive_unload(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, OLLAMA_KEEP_ALIVE="2s"))
    assert emu.post_json("/api/generate", {"model": MODEL, "prompt": ""})[0] == 200
    target = guard.Target("gpu:0", f"http://127.0.0.1:{emu.port}", [MODEL], CONFIG)
    target.emu = emu
    unloaded_after = _rounds(target, 6)
    assert unloaded_after is not None and unloaded_after < 3.5, target.counts
    assert target.counts["pass"] >= 3 and target.counts["fail"] == 0 and target.failed == 0


def test_control_a_canary_without_keep_alive_keeps_the_model(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, OLLAMA_KEEP_ALIVE="2s"))
    assert emu.post_json("/api/generate", {"model": MODEL, "prompt": ""})[0] == 200
    base = f"http://127.0.0.1:{emu.port}"
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert guard.canary(base, MODEL, 5)[0] == "pass"
        time.sleep(0.25)
    assert _loaded(emu) == [MODEL]


def test_a_model_loaded_forever_stays_loaded(start_emulator, lab_models):
    emu = start_emulator(**fast(lab_models, OLLAMA_KEEP_ALIVE="-1"))
    assert emu.post_json("/api/generate", {"model": MODEL, "prompt": ""})[0] == 200
    target = guard.Target("gpu:0", f"http://127.0.0.1:{emu.port}", [MODEL], CONFIG)
    target.emu = emu
    assert _rounds(target, 2) is None and target.counts["pass"] >= 2
    assert int(emu.get_json("/api/ps")["models"][0]["expires_at"][:4]) > 2200
