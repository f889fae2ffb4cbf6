"""An `ollama serve` process for unit tests: the REAL Ollama 0.3.6 binary (lab/build/real, `make lab-artifacts`) or
herd's emulator, on a free loopback port with a private HOME and TMPDIR (older real builds delete every
$TMPDIR/ollama* directory they do not own). Shared by the contract tests (tests/unit/standins) and the gateway's
tests against the real server (tests/unit/gateway)."""

import http.client
import json
import os
import socket
import subprocess
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "lab" / "build" / "real"
REAL_ARCHIVE = REAL / "ollama-linux-amd64.tgz"
REAL_STORE = REAL / "store"  # made by the real `ollama create` (lab/build-real-ollama.sh): herd-real-tiny:latest


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(proc, grace=10):
    """Terminate a server process; kill it if it has not exited after `grace` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def unpack_real_release(dest):
    """Unpack the real release archive into dest; return the path of its bin/ollama."""
    with tarfile.open(REAL_ARCHIVE) as tar:
        tar.extractall(dest, filter="data")
    return Path(dest) / "bin" / "ollama"


class OllamaProcess:
    """`<argv> serve` on a free loopback port, OLLAMA_MODELS=models, private dirs under workdir."""

    def __init__(self, argv, workdir, models, extra_env):
        self.port = free_port()
        self.workdir = workdir
        (workdir / "tmp").mkdir(parents=True)
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
                    "TMPDIR": str(workdir / "tmp"), "OLLAMA_HOST": f"127.0.0.1:{self.port}",
                    "OLLAMA_MODELS": str(models), "OLLAMA_NOPRUNE": "1", "HERD_EMU_ACCESS_LOG": "0", **extra_env}
        self.log_path = workdir / "serve.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([*argv, "serve"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{argv[0]} did not start: {self.log_path.read_text()}")

    def request(self, method, path, body=None, timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body.encode() if isinstance(body, str) else body
            conn.request(method, path, body=data)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def json(self, method, path, body=None):
        status, _headers, raw = self.request(method, path, body)
        return status, json.loads(raw)

    def stop(self):
        stop_process(self.proc)
