"""Locust users for herd's gateway, for teams that prefer Locust to tools/herd_load.py.

    pip install locust
    locust -f tools/locustfile.py --host http://127.0.0.1:8080 --headless -u 16 -r 4 -t 2m

Streams /api/generate and /api/chat (weights 3:1) and reports, besides Locust's own rows
(time to response headers), two custom rows per endpoint:
  TTFT     time to the first content token
  STREAM   time to the end of the streamed answer (response_length = output tokens)
Failures: non-2xx answers, an ``error`` object inside the stream, or a stream that never says done.
The ``X-Herd-Upstream`` header of each answer is counted per instance and printed at the end.

Settings (environment): HERD_LOCUST_MODEL (default llama3.2:1b), HERD_LOCUST_NUM_PREDICT (default 64),
HERD_LOCUST_PROMPT_WORDS (default 32), HERD_LOAD_API_KEY (Bearer key for the gateway),
HERD_LOCUST_ALLOW_REMOTE=1 to allow a host outside loopback/private networks (same rule as herd_load).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
import herd_load  # noqa: E402 - the load tool next to this file: shared target rule and prompts

MODEL = os.environ.get("HERD_LOCUST_MODEL", "llama3.2:1b")
NUM_PREDICT = int(os.environ.get("HERD_LOCUST_NUM_PREDICT", "64"))
PROMPT_WORDS = int(os.environ.get("HERD_LOCUST_PROMPT_WORDS", "32"))
API_KEY = os.environ.get("HERD_LOAD_API_KEY", "")
ALLOW_REMOTE = os.environ.get("HERD_LOCUST_ALLOW_REMOTE") == "1"

UPSTREAMS: collections.Counter = collections.Counter()


@events.test_start.add_listener
def _check_target(environment, **_kwargs):
    parts = urlsplit(environment.host or "")
    if not parts.hostname:
        logging.error("herd locustfile: give --host http://GATEWAY[:PORT]")
        environment.process_exit_code = 2
        environment.runner.quit()
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    allowed, why = herd_load.target_allowed(parts.hostname, herd_load.resolve(parts.hostname, port), ALLOW_REMOTE)
    if not allowed:
        logging.error("herd locustfile: refused: %s (HERD_LOCUST_ALLOW_REMOTE=1 to override)", why)
        environment.process_exit_code = 2
        environment.runner.quit()


@events.test_stop.add_listener
def _print_spread(**_kwargs):
    total = sum(UPSTREAMS.values())
    if total:
        print("requests per instance (X-Herd-Upstream):")
        for name, count in sorted(UPSTREAMS.items()):
            print(f"  {name}: {count} ({100 * count / total:.1f}%)")


class OllamaUser(HttpUser):
    wait_time = between(0.0, 0.5)

    def on_start(self):
        self.seq = 0
        if API_KEY:
            self.client.headers["Authorization"] = "Bearer " + API_KEY

    def _stream(self, path: str, body: dict, pick_text) -> None:
        start = time.perf_counter()
        ttft = None
        tokens = chunks = 0
        done = False
        with self.client.post(path, json=body, stream=True, catch_response=True, name=path) as resp:
            UPSTREAMS[resp.headers.get("X-Herd-Upstream", "unknown")] += 1
            if not resp.ok:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines():
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    resp.failure("answer line is not JSON")
                    return
                if obj.get("error"):
                    resp.failure(f"stream error: {obj['error']}")
                    return
                if pick_text(obj):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
                if obj.get("done"):
                    done = True
                    tokens = obj.get("eval_count") or chunks
            if not done:
                resp.failure("stream ended without done")
                return
            resp.success()
        total = time.perf_counter() - start
        fire = self.environment.events.request.fire
        if ttft is not None:
            fire(request_type="TTFT", name=path, response_time=ttft * 1000, response_length=0, exception=None,
                 context={})
        fire(request_type="STREAM", name=path, response_time=total * 1000, response_length=tokens, exception=None,
             context={})

    def _prompt(self) -> str:
        self.seq += 1
        return herd_load.make_prompt(PROMPT_WORDS, self.seq)

    @task(3)
    def generate(self):
        body = {"model": MODEL, "prompt": self._prompt(), "stream": True, "options": {"num_predict": NUM_PREDICT}}
        self._stream("/api/generate", body, lambda o: o.get("response"))

    @task(1)
    def chat(self):
        body = {"model": MODEL, "messages": [{"role": "user", "content": self._prompt()}], "stream": True,
                "options": {"num_predict": NUM_PREDICT}}
        self._stream("/api/chat", body, lambda o: (o.get("message") or {}).get("content"))
