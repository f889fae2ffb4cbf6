"""Helpers and fixtures for herd's lab stand-ins: lab models, GPU specs and emulator processes on loopback."""

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from herd_testing import load_module
from ollama_process import free_port, stop_process  # noqa: F401 - free_port is used by the standins tests

REPO = Path(__file__).resolve().parents[3]
STANDINS = REPO / "lab" / "standins"
GPUS = REPO / "lab" / "gpus"
EMULATOR = STANDINS / "ollama_emulator.py"
NVIDIA_SMI = STANDINS / "nvidia-smi"


emulator = load_module(EMULATOR, "herd_ollama_emulator")
mkmodels = load_module(STANDINS / "mkmodels.py", "herd_mkmodels")
nvidia_smi = load_module(NVIDIA_SMI, "herd_nvidia_smi")
lab_registry_module = load_module(STANDINS / "lab_registry.py", "herd_lab_registry")


@pytest.fixture(scope="session")
def lab_models(tmp_path_factory):
    """A models directory holding every lab model (read-only for tests: copy before mutating)."""
    path = tmp_path_factory.mktemp("models")
    mkmodels.write_models(str(path))
    return path


class Emu:
    """One emulator process started as `ollama serve` would be, on a free loopback port."""

    def __init__(self, tmp_path, env, port=None):
        self.port = port or free_port()
        self.log_path = tmp_path / f"emulator-{self.port}.log"
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
                    "OLLAMA_HOST": f"127.0.0.1:{self.port}", "HERD_EMU_ACCESS_LOG": "0"}
        full_env.update(env)
        self.env = full_env
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(EMULATOR), "serve"], env=full_env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.get("/")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("emulator did not start: " + self.log())

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        stop_process(self.proc, grace=5)

    def conn(self, timeout=30):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path, method="GET"):
        conn = self.conn(5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get_json(self, path):
        status, body = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def post(self, path, payload, method="POST", timeout=30):
        """Send a request; return (status, headers, list of (monotonic arrival time, raw line))."""
        conn = self.conn(timeout)
        try:
            conn.request(method, path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            lines = []
            while True:
                line = resp.readline()
                if not line:
                    break
                lines.append((time.monotonic(), line.rstrip(b"\n")))
            return resp.status, dict(resp.getheaders()), lines
        finally:
            conn.close()

    def post_json(self, path, payload, method="POST"):
        status, _headers, lines = self.post(path, payload, method)
        body = b"\n".join(line for _t, line in lines)
        return status, (json.loads(body) if body else None)


@pytest.fixture
def start_emulator(tmp_path):
    started = []

    def start(port=None, **env):
        emu = Emu(tmp_path, {key: str(value) for key, value in env.items()}, port)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()


@pytest.fixture
def start_registry():
    """Start lab/standins/lab_registry.py's server on a free loopback port (in a thread) serving a directory."""
    import threading  # noqa: PLC0415 - only this fixture needs it

    servers = []

    def start(root, blob_host=""):
        server = lab_registry_module.Registry(("127.0.0.1", 0), str(root), blob_host)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        server.port = server.server_address[1]
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
