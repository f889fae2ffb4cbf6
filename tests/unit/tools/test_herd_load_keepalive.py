"""herd_load resends once when a reused keep-alive connection is closed before any response byte (as nginx
does to idle client connections when it reloads), and stops cleanly on SIGTERM."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from herd_testing import load_module

TOOL = Path(__file__).resolve().parents[3] / "tools" / "herd_load.py"
hl = load_module("tools/herd_load.py", "herd_load_ka")

BODY = json.dumps({"model": "m", "response": "hi", "done": True, "eval_count": 1}).encode()


class ClosingServer:
    """Answers the first request on each connection, then closes it when the next request arrives."""

    def __init__(self):
        self.connections = 0
        self.answered = 0
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def handle(self, reader, writer):
        self.connections += 1
        first = True
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int([ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0].split(b":")[1])
            await reader.readexactly(length)
            if not first:
                writer.close()
                return
            first = False
            self.answered += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(BODY), BODY))
            await writer.drain()

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)


def test_stale_keepalive_connection_is_resent_once_on_a_fresh_one():
    srv = ClosingServer()
    try:
        cfg = hl.Config(url=f"http://127.0.0.1:{srv.port}", api="generate", model="m", concurrency=1, requests=6,
                        duration=20, stream=False, mix=hl.parse_mix("short"), progress=0)
        result = hl.run(cfg, out=open("/dev/null", "w"))
    finally:
        srv.stop()
    s = result["summary"]
    assert s["requests"] == 6 and s["ok"] == 6 and s["errors"] == 0
    assert s["stale_keepalive_retries"] == 5  # every request after the first met a closed keep-alive connection
    assert srv.answered == 6 and srv.connections == 6  # each retry opened the next connection


def test_sigterm_stops_issuing_and_still_writes_the_result(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.Popen([sys.executable, str(TOOL), "--url", "http://127.0.0.1:9", "--concurrency", "1",
                          "--requests", "100000", "--duration", "120", "--quiet", "--progress", "0", "--json", str(out)])
    time.sleep(1.5)
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=20)
    assert time.monotonic() - t < 10
    summary = json.loads(out.read_text())["summary"]
    assert 0 < summary["requests"] < 100000 and summary["ok"] == 0
