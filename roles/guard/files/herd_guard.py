#!/usr/bin/python3
"""herd guard: active health of Ollama instances, judged by progress, with one owner for the actions they trigger.

Every few seconds each instance gets a liveness probe (GET /api/ps, short timeout). What it is doing for clients
comes from the gateways, the one owner of pool membership and in-flight counts: the gateway's GET /herd/pools
gives per instance its pools, requests in flight, drained, and the age of its last upstream byte (progress). A
gateway's guard reads its own gateway's /herd/pools and publishes that view on /metrics (herd_guard_gateway_*);
every guard reads the other gateways' guards (`peers`), so each one sees the whole cluster.

- An instance with requests in flight is hung only when none of them produced a byte for `stall_seconds` on
  some gateway (tokens flowing = alive, however long the answers).
- A canary (a 1-token /api/generate of a loaded model, a one-input /api/embed of a model that only embeds, in
  the background, with the time the model has left as keep_alive so that it never keeps an idle model loaded) runs only while the instance has a free slot (in flight
  over every gateway below its num_parallel), so it never queues behind clients; one that timed out while the
  instance made progress counts as busy. An answer "server busy" (503) is neither a pass nor a failure.
- A probe or canary that fails (refused, error, timeout while idle) fails the round, as before.

Two duties, by the host's config:

- gateway (gateway hosts): every instance the gateway lists is probed; after `failures` failed rounds (or a
  stall) it is drained on this gateway through the drain command (the gateway's runtime admin location, no
  reload), unless by the gateway's own membership it is the last instance in rotation of one of its pools; after
  `passes` good rounds in a row it is undrained. The guard only undrains what it drained itself (kept in
  `state_file`); servers an operator drained are left alone.
- local (GPU hosts): after `restart_failures` failed rounds in a row (or a stall) the unit (systemctl restart) or
  container (docker restart) is restarted, but only once no gateway holds progressing requests on it and every
  gateway has drained it (or keeps it as the last of a pool: then it serves nothing while hung); at most one
  restart at a time on the host, an exponential backoff per instance (restart_interval x 2^(restarts of the
  last hour)), and at most `restart_max_per_hour` on the host, after which it stops restarting and says so. It
  waits until a restarted instance is warm again (answers, and a canary of the models it had loaded passes).

Every action is logged (stdout -> journal) and counted on /metrics (Prometheus text format). Each loop's rounds run
inside their own error handling (herd_guard_round_errors_total); systemd's watchdog is pinged only while every
loop is live, so a dead or stuck loop gets the service restarted (herd_service.Loop, herd_service.Watchdog).
Standard library and herd_service (herd's service library, on PYTHONPATH).
Usage: herd-guard --config /etc/herd/guard.json [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime

import herd_service as hs
from herd_service import escape, load_config

LOCAL_ACTIONS = ("restart", "restart_failed")
GATEWAY_ACTIONS = ("drain", "drain_failed", "drain_refused", "undrain", "undrain_failed")
COMMAND_TIMEOUT = 120


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def check_config(config):
    """Raise ValueError naming the first bad setting; return the config."""
    for key in ("interval", "probe_timeout", "canary_timeout", "warm_timeout", "restart_interval", "stall_seconds"):
        if float(config[key]) <= 0:
            raise ValueError(f"{key} must be above 0")
    for key in ("failures", "restart_failures", "passes", "restart_max_per_hour"):
        if int(config[key]) < 1:
            raise ValueError(f"{key} must be 1 or more")
    hs.check_listen(config)
    local = config.get("local")
    if local:
        if local["mode"] not in ("systemd", "container"):
            raise ValueError("local.mode must be systemd or container")
        for inst in local["instances"]:
            int(inst["id"]), int(inst["port"]), str(inst["unit"]), str(inst["container"])
            if not str(inst["local_url"]).startswith("http://"):
                raise ValueError(f"local.instances: local_url of instance {inst['id']} must be an http:// URL")
    gateway = config.get("gateway")
    if gateway:
        for key in ("drain_command", "state_file"):
            if not str(gateway[key]).startswith("/"):
                raise ValueError(f"gateway.{key} must be an absolute path")
        if not str(gateway["pools_url"]).startswith(("http://", "https://")):
            raise ValueError("gateway.pools_url must be an http:// or https:// URL")
    for url in config.get("peers") or []:
        if not str(url).startswith("http://"):
            raise ValueError(f"peers: {url} must be an http:// URL")
    if not local and not gateway:
        raise ValueError("nothing to guard: neither local instances nor a gateway")
    return config


def loaded_models(ps_body):
    """Model names in an /api/ps answer."""
    data = json.loads(ps_body)
    return [str(m.get("name") or m.get("model")) for m in data.get("models") or [] if m.get("name") or m.get("model")]


# A model "loaded forever" (keep_alive -1) expires in about 292 years (Ollama: now + MaxInt64 ns); anything past
# ten years is treated as forever.
FOREVER_AFTER = 10 * 365 * 86400


def expiries(ps_body, now=None):
    """{model: seconds until it unloads, or None when /api/ps gives no usable expires_at} of an /api/ps answer."""
    now = time.time() if now is None else now
    out = {}
    for m in json.loads(ps_body).get("models") or []:
        name = m.get("name") or m.get("model")
        if not name:
            continue
        try:
            when = datetime.fromisoformat(str(m["expires_at"]))
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
            out[str(name)] = when.timestamp() - now
        except (KeyError, ValueError, OverflowError):
            out[str(name)] = None
    return out


def canary_keep_alive(remaining):
    """The keep_alive a canary sends so that it never extends a model's residency: the time it has left.

    A canary is a request like any other: without keep_alive, Ollama would restart the model's expiry timer with
    OLLAMA_KEEP_ALIVE after it, and a canary every few seconds would keep a model with a finite keep_alive
    (seed 004's 15s) loaded forever. Returns None (send no keep_alive) when the time left is unknown, -1 for a
    model loaded forever, "skip" when the model unloads within a second (a canary then would reload it)."""
    if remaining is None:
        return None
    if remaining > FOREVER_AFTER:
        return -1
    if remaining < 1:
        return "skip"
    return f"{int(remaining * 1000)}ms"


def pools_view(doc):
    """{key: instance} of the gateway's GET /herd/pools answer (its "instances"): the gateway's own membership
    (pools, "*" included), in flight, num_parallel, drained, down (drained or failed there) and progress age
    (seconds since the last upstream byte or the first admission, None when none was seen), plus `last`: the
    pools in which it is the only instance in rotation by that membership (draining it would empty them)."""
    view = {}
    for inst in doc.get("instances") or []:
        age = inst.get("progress_age")
        view[str(inst["key"])] = {
            "endpoint": str(inst.get("endpoint") or ""), "pools": [str(p) for p in inst.get("pools") or []],
            "inflight": int(inst.get("inflight") or 0), "num_parallel": int(inst.get("num_parallel") or 1),
            "drained": bool(inst.get("drained")), "down": bool(inst.get("down")),
            "age": None if age is None else float(age),
        }
    for key, inst in view.items():
        inst["last"] = [p for p in inst["pools"]
                        if not any(k != key and p in o["pools"] and not o["down"] for k, o in view.items())]
    return view


GATEWAY_SERIES = (("inflight", "herd_guard_gateway_inflight", "Requests in flight on the instance through this gateway."),
                  ("drained", "herd_guard_gateway_drained", "1 while the instance is drained on this gateway (by anyone)."),
                  ("last", "herd_guard_gateway_last_in_pool",
                   "1 while the instance is the last one in rotation of one of its pools on this gateway (never drained)."),
                  ("age", "herd_guard_gateway_progress_age_seconds",
                   "Seconds since the instance's last upstream byte through this gateway (or its first admission)."))
SERIES_RE = re.compile(r'^(herd_guard_gateway_[a-z_]+)\{server="((?:[^"\\]|\\.)*)"\} (\S+)$', re.M)


def metrics_view(text):
    """The gateway view a peer gateway's guard publishes on /metrics (GATEWAY_SERIES) -> {key: instance}."""
    names = {metric: field for field, metric, _help in GATEWAY_SERIES}
    view = {}
    for metric, key, value in SERIES_RE.findall(text):
        field = names.get(metric)
        if field is None:
            continue
        key = key.replace('\\"', '"').replace("\\\\", "\\")
        inst = view.setdefault(key, {"inflight": 0, "drained": False, "last": [], "age": None})
        number = float(value)
        inst[field] = (int(number) if field == "inflight" else bool(number) if field == "drained"
                       else ["?"] if field == "last" and number else [] if field == "last" else number)
    return view


def cluster_state(key, views, stall):
    """What every gateway says of instance `key`. `views`: {gateway: view, or None when it did not answer}.

    Returns {inflight (sum), progressing (gateways whose requests on it produced a byte within `stall`),
    stalled ([(gateway, age, in flight)] with requests in flight and no byte for `stall` seconds), waiting
    (gateways that neither drained it nor keep it as a pool's last), unknown (gateways that did not answer),
    age (the youngest progress age among gateways with requests in flight, or None)}."""
    state = {"inflight": 0, "progressing": [], "stalled": [], "waiting": [], "unknown": [], "age": None}
    for gateway, view in sorted(views.items()):
        if view is None:
            state["unknown"].append(gateway)
            continue
        inst = view.get(key)
        if inst is None:
            continue
        state["inflight"] += inst["inflight"]
        if inst["inflight"] > 0:
            age = inst["age"]
            if age is not None and age >= stall:
                state["stalled"].append((gateway, age, inst["inflight"]))
            else:
                state["progressing"].append(gateway)
            if age is not None and (state["age"] is None or age < state["age"]):
                state["age"] = age
        if not inst["drained"] and not inst["last"]:
            state["waiting"].append(gateway)
    return state


def restart_blockers(state):
    """Why an instance may not be restarted now by what the gateways say (empty: it may)."""
    why = []
    if state["unknown"]:
        why.append(f"no answer from gateway {', '.join(state['unknown'])}")
    if state["progressing"]:
        why.append(f"requests in flight make progress through {', '.join(state['progressing'])}")
    if state["waiting"]:
        why.append(f"not drained yet on {', '.join(state['waiting'])}")
    return why


def restart_wait(history, now, interval, key):
    """Seconds instance `key` must still wait before its next restart (exponential backoff): restart_interval x
    2^(n-1) after its last one, n = its restarts within the last hour. `history`: [(time, key)] of the host."""
    mine = [t for t, k in history if k == key and now - t < 3600]
    if not mine:
        return 0.0
    return max(0.0, max(mine) + float(interval) * 2 ** (len(mine) - 1) - now)


# ---------------------------------------------------------------------------------------------------------
# Probes


def _request(url, timeout, body=None, limit=1 << 20):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} if data else {})
    # https only for the own gateway on loopback (its certificate may be self-signed).
    context = ssl._create_unverified_context() if url.startswith("https://127.0.0.1") else None  # noqa: S323
    with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # noqa: S310 - the plan's hosts only
        return resp.status, resp.read(limit)


def fetch_view(url, timeout):
    """One gateway's view: its own /herd/pools (JSON) or a peer guard's /metrics; None when it does not answer."""
    try:
        status, body = _request(url, timeout, limit=8 << 20)
        if status != 200:
            return None
        text = body.decode("utf-8", "replace")
        return pools_view(json.loads(text)) if url.endswith("/herd/pools") else metrics_view(text)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def probe(base, timeout):
    """(ok, {loaded model: seconds until it unloads or None}, why) from GET /api/ps."""
    try:
        status, body = _request(base + "/api/ps", timeout)
        return status == 200, expiries(body), f"/api/ps answered {status}"
    except (OSError, ValueError) as exc:
        return False, {}, f"/api/ps: {exc}"


# Models an instance answered "does not support generate" (Ollama's 400 for an embedding-only model): their canary
# is a one-input /api/embed from then on. Learnt from the answer, never assumed: an instance that says so about a
# model that can generate gets an embed canary, which proves it answers all the same.
EMBED_ONLY = set()
NO_GENERATE = "does not support generate"


def canary(base, model, timeout, keep_alive=None):
    """'pass', 'busy' or 'fail', and why: a 1-token generate of a loaded model, or a one-input embed of a model that
    only embeds (keep_alive: see canary_keep_alive)."""
    embed = model in EMBED_ONLY
    body = {"model": model, "input": "ok"} if embed else {"model": model, "prompt": "ok", "stream": False,
                                                          "options": {"num_predict": 1}}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    what = "embed" if embed else "generate"
    try:
        status, answer = _request(base + ("/api/embed" if embed else "/api/generate"), timeout, body)
        doc = json.loads(answer)
        if status == 200 and (doc.get("embeddings") if embed else doc.get("done") is True):
            return "pass", "embedded" if embed else "generated"
        return "fail", f"{what} answered {status}"
    except urllib.error.HTTPError as exc:
        if exc.code == 400 and not embed and NO_GENERATE in exc.read(4096).decode("utf-8", "replace"):
            EMBED_ONLY.add(model)
            return canary(base, model, timeout, keep_alive)
        return ("busy" if exc.code == 503 else "fail"), f"{what} answered {exc.code}"
    except (OSError, ValueError, AttributeError) as exc:
        return "fail", f"{what}: {exc}"


# ---------------------------------------------------------------------------------------------------------
# State of one instance


class Target:
    """Probe results of one instance; the canary runs in its own thread. `num_parallel`: its slots (the canary
    runs only while the gateways hold fewer requests on it)."""

    def __init__(self, key, base, models, config, num_parallel=1):
        self.key, self.base, self.models = key, base, list(models)
        self.num_parallel = max(1, int(num_parallel or 1))
        self.config = config
        self.lock = threading.Lock()
        self.failed = 0
        self.live_failed = 0
        self.canary_failed = 0
        self.canary_why = ""
        self.passed = 0
        self.loaded = []
        self.canary_result = None
        self.canary_thread = None
        self.stalled = ""
        self.why = ""
        self.counts = {"pass": 0, "fail": 0, "busy": 0}

    def _run_canary(self, model, keep_alive):
        started = time.monotonic()
        result, why = canary(self.base, model, float(self.config["canary_timeout"]), keep_alive)
        with self.lock:
            self.canary_result = (result, why, time.monotonic() - started)

    def round(self, state=None):
        """One liveness probe, and a canary started when none is running and the instance has a free slot.
        `state`: what the gateways say of it (cluster_state), None without gateways. Returns (healthy, why).

        `failed` counts the later of two streaks: liveness probes failed in a row, and canaries failed in a row
        (a canary takes up to canary_timeout, so it spans rounds; "busy" neither breaks nor extends its streak; a
        canary that failed while the gateways saw the instance produce bytes is busy). A stall (requests in
        flight, no byte for stall_seconds on some gateway) fails the round at once and sets `stalled`.
        """
        ok, expiry, why = probe(self.base, float(self.config["probe_timeout"]))
        loaded = list(expiry)
        inflight = state["inflight"] if state else 0
        with self.lock:
            self.loaded = loaded or self.loaded
            result = self.canary_result
            self.canary_result = None
            running = self.canary_thread is not None and self.canary_thread.is_alive()
        if result is not None and result[0] == "fail" and state and state["age"] is not None and state["age"] < result[2]:
            # Tokens flowed on the instance while the canary waited: it queued behind clients, it is not hung.
            result = ("busy", f"{result[1]} while requests in flight made progress", result[2])
        if result is not None:
            self.counts[result[0]] += 1
        if ok and loaded and not running and inflight < self.num_parallel:
            model = next((m for m in loaded if m in self.models), loaded[0])
            keep_alive = canary_keep_alive(expiry[model])
            if keep_alive != "skip":
                self.canary_thread = threading.Thread(target=self._run_canary, args=(model, keep_alive), daemon=True)
                self.canary_thread.start()
                running = True
        stalled = state["stalled"] if state else []
        with self.lock:
            self.live_failed = 0 if ok else self.live_failed + 1
            if result is not None and result[0] == "fail":
                self.canary_failed += 1
                self.canary_why = result[1]
            elif result is not None and result[0] == "pass":
                self.canary_failed = 0
            if ok and not loaded and not running:
                # Nothing loaded: no runner that could hang and no canary to run, so liveness alone decides (else
                # an instance back from a restart with no model loaded kept its old canary failures for ever, and
                # a gateway never undrained it: nothing reaches a drained instance to load a model).
                self.canary_failed = 0
            self.stalled = "; ".join(f"{n} requests in flight through {gw} produced no byte for {age:.0f} s"
                                     for gw, age, n in stalled)
            self.failed = max(self.live_failed, self.canary_failed, 1 if stalled else 0)
            healthy = self.failed == 0
            if not healthy:
                why = why if not ok else self.stalled or self.canary_why
            self.passed, self.why = (self.passed + 1, "") if healthy else (0, why)
        return healthy, why

    def reset(self):
        with self.lock:
            self.failed = self.live_failed = self.canary_failed = self.passed = 0
            self.why, self.canary_result, self.stalled = "", None, ""


# ---------------------------------------------------------------------------------------------------------
# The guard


class Guard:
    def __init__(self, config, run=subprocess.run, clock=time.monotonic, sleep=time.sleep, fetch=fetch_view):
        self.config = config
        self.run, self.clock, self.sleep, self.fetch = run, clock, sleep, fetch
        self.lock = threading.Lock()
        self.actions = {}
        self.targets = {}
        self.history = []  # (time, key) of this host's restarts
        self.restarting = threading.Lock()  # at most one restart at a time on the host
        self.capped = False
        self.deferred = {}
        self.gateway_silent = False
        self.drained = set()
        self.views = {}  # gateway name -> its view (pools_view / metrics_view), or None when it did not answer
        self.views_at = None
        self.views_lock = threading.Lock()
        self.fetching = threading.Lock()
        self.stop = threading.Event()
        self.loops = []
        gateway = config.get("gateway")
        if gateway:
            self.drained = set(self._read_json(gateway["state_file"], []))

    # -- helpers ---------------------------------------------------------------------------------------------
    @staticmethod
    def _read_json(path, default):
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return default

    def log(self, text):
        print(f"herd-guard: {text}", flush=True)

    def count(self, key, action):
        with self.lock:
            self.actions[(key, action)] = self.actions.get((key, action), 0) + 1

    def command(self, argv):
        """(ok, output) of a command run with a bounded time."""
        hs.beat()  # the round is still making progress: the command has its own time limit
        try:
            done = self.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
            return done.returncode == 0, (done.stdout + done.stderr).strip()[-500:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, str(exc)

    # -- what the gateways say -------------------------------------------------------------------------------
    def gateway_views(self, fresh=False):
        """{gateway: view or None} of this host's gateway (its /herd/pools) and every peer gateway's guard, read at
        most once per interval (shared by every loop of this guard)."""
        sources = list(self.config.get("peers") or [])
        if self.config.get("gateway"):
            sources.insert(0, self.config["gateway"]["pools_url"])
        with self.fetching:  # one reader at a time; /metrics only waits for views_lock
            now = self.clock()
            if fresh or self.views_at is None or now - self.views_at >= float(self.config["interval"]) / 2:
                timeout = float(self.config["probe_timeout"])
                results = {}
                threads = [threading.Thread(target=lambda u: results.__setitem__(u, self.fetch(u, timeout)), args=(u,),
                                            daemon=True) for u in sources]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout + 1)
                with self.views_lock:
                    self.views = {self.source_name(u): results.get(u) for u in sources}
                    self.views_at = now
            with self.views_lock:
                return dict(self.views)

    def source_name(self, url):
        if self.config.get("gateway") and url == self.config["gateway"]["pools_url"]:
            return self.config["host"]
        return urllib.parse.urlsplit(url).hostname or url

    def state_of(self, key, views):
        return cluster_state(key, views, float(self.config["stall_seconds"])) if views else None

    # -- local duty ------------------------------------------------------------------------------------------
    def local_targets(self):
        local = self.config.get("local") or {}
        out = []
        for inst in local.get("instances", []):
            key = f"{self.config['host']}:{inst['id']}"
            if key not in self.targets:
                self.targets[key] = Target(key, str(inst["local_url"]).rstrip("/"), inst.get("models", []), self.config,
                                           inst.get("num_parallel", 1))
            out.append((self.targets[key], inst))
        return out

    def defer(self, target, why):
        """Log once why a due restart waits (again when the reason changes)."""
        if self.deferred.get(target.key) != why:
            self.deferred[target.key] = why
            self.log(f"restart of {target.key} waits: {why}")

    def maybe_restart(self, target, inst, state):
        """Restart a failing instance when the gateways, the host's one-at-a-time rule, its backoff and the
        hourly cap allow it. Returns True when it restarted."""
        blockers = restart_blockers(state) if state else []
        if blockers:
            self.defer(target, "; ".join(blockers))
            return False
        now = self.clock()
        cap = int(self.config["restart_max_per_hour"])
        with self.lock:
            self.history = [(t, k) for t, k in self.history if now - t < 3600]
            recent = len(self.history)
        if recent >= cap:
            if not self.capped:
                self.capped = True
                self.log(f"restart cap reached: {recent} restarts on {self.config['host']} within the last hour "
                         f"(guard_restart_max_per_hour {cap}); herd-guard restarts nothing more until the hour has "
                         f"passed; {target.key} stays as it is ({target.why})")
            return False
        self.capped = False
        wait = restart_wait(self.history, now, self.config["restart_interval"], target.key)
        if wait > 0:
            self.defer(target, f"backoff, next restart possible in {wait:.0f} s")
            return False
        if not self.restarting.acquire(blocking=False):
            self.defer(target, "another instance of this host is restarting")
            return False
        try:
            self.deferred.pop(target.key, None)
            with self.lock:
                self.history.append((now, target.key))
            self.restart(target, inst)
        finally:
            self.restarting.release()
        return True

    def restart(self, target, inst):
        mode = self.config["local"]["mode"]
        argv = (["systemctl", "restart", inst["unit"]] if mode == "systemd" else ["docker", "restart", "-t", "10", inst["container"]])
        self.log(f"restart {target.key} ({' '.join(argv)}): {target.failed} failed rounds in a row, last: {target.why}")
        ok, out = self.command(argv)
        if not ok:
            self.count(target.key, "restart_failed")
            self.log(f"restart of {target.key} failed: {out}")
            return
        self.count(target.key, "restart")
        models = target.loaded or target.models[:1]
        warm = self.wait_warm(target, models)
        state = f"is warm again after {warm:.1f} s" if warm is not None else f"is not warm within {self.config['warm_timeout']} s"
        self.log(f"{target.key} {state} (models {', '.join(models) or 'none loaded'})")
        target.reset()

    def wait_warm(self, target, models):
        """Seconds until the instance answers and a canary of each model passes, or None (bounded by warm_timeout)."""
        limit = float(self.config["warm_timeout"])
        start = self.clock()
        while self.clock() - start < limit and not self.stop.is_set():
            ok, _loaded, _why = probe(target.base, float(self.config["probe_timeout"]))
            if ok and all(canary(target.base, m, max(1.0, limit - (self.clock() - start)))[0] == "pass" for m in models):
                return self.clock() - start
            self.sleep(1)
        return None

    # -- gateway duty ----------------------------------------------------------------------------------------
    def gateway_servers(self, views):
        """The instances of this host's gateway, by its own /herd/pools (None: the gateway did not answer)."""
        own = views.get(self.config["host"])
        if own is None:
            return None
        for key, inst in own.items():
            if key not in self.targets:
                self.targets[key] = Target(key, f"http://{inst['endpoint']}", [], self.config, inst["num_parallel"])
            self.targets[key].num_parallel = inst["num_parallel"]
        return own

    def save_drained(self):
        path = self.config["gateway"]["state_file"]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(sorted(self.drained), fh)
            fh.write("\n")
        os.replace(tmp, path)

    def gateway_act(self, own):
        """Drain failing instances on this gateway (never the last in rotation of a pool, by the gateway's own
        membership `own`), undrain the ones it drained once they pass again."""
        gateway = self.config["gateway"]
        operator = {k for k, inst in own.items() if inst["drained"] and k not in self.drained}
        for key, inst in own.items():
            target = self.targets[key]
            if key in operator:
                continue
            failing = target.failed >= int(self.config["failures"]) or bool(target.stalled)
            if failing and key not in self.drained:
                lonely = [] if inst["drained"] else inst["last"]
                if lonely:
                    if target.failed == int(self.config["failures"]) or (target.stalled and target.failed == 1):
                        self.count(key, "drain_refused")
                        self.log(f"keep {key} in the gateway although it failed {target.failed} rounds ({target.why}): "
                                 f"it is the last instance in rotation of pool {', '.join(lonely)}")
                    continue
                self.log(f"drain {key}: {target.failed} failed rounds in a row, last: {target.why}")
                ok, out = self.command([gateway["drain_command"], "drain", key])
                if ok:
                    self.drained.add(key)
                    self.save_drained()
                    self.count(key, "drain")
                    inst["drained"] = inst["down"] = True
                    for other_key, other in own.items():  # the others' `last` by the new membership
                        other["last"] = [p for p in other["pools"] if not any(
                            k != other_key and p in o["pools"] and not o["down"] for k, o in own.items())]
                else:
                    self.count(key, "drain_failed")
                    self.log(f"drain of {key} failed: {out}")
            elif key in self.drained and not failing and target.passed >= int(self.config["passes"]):
                self.log(f"undrain {key}: {target.passed} good rounds in a row")
                ok, out = self.command([gateway["drain_command"], "undrain", key])
                if ok:
                    self.drained.discard(key)
                    self.save_drained()
                    self.count(key, "undrain")
                else:
                    self.count(key, "undrain_failed")
                    self.log(f"undrain of {key} failed: {out}")

    # -- loops: one round of each (herd_service.Loop runs them, each round inside its own error handling) --------
    def local_round(self, target, inst):
        """One round of an instance of this host: probe (and canary), then a restart when it is due and allowed."""
        state = self.state_of(target.key, self.gateway_views())
        healthy, why = target.round(state)
        if not healthy:
            self.log(f"{target.key} failed round {target.failed}: {why}")
            if target.failed >= int(self.config["restart_failures"]) or target.stalled:
                self.maybe_restart(target, inst, self.state_of(target.key, self.gateway_views(fresh=True)))
        else:
            self.deferred.pop(target.key, None)

    def gateway_round(self):
        """One round of every instance of this host's gateway, then the drains and undrains due."""
        views = self.gateway_views()
        own = self.gateway_servers(views)
        if own is None:
            if not self.gateway_silent:
                self.gateway_silent = True
                self.log(f"the gateway's {self.config['gateway']['pools_url']} does not answer: no instance is judged "
                         "until it does")
            return
        if self.gateway_silent:
            self.gateway_silent = False
            self.log("the gateway answers again")
        threads = [threading.Thread(target=hs.guarded(self.targets[k].round), args=(self.state_of(k, views),),
                                    daemon=True) for k in own]
        for t in threads:
            t.start()
        for t in threads:
            t.join(float(self.config["probe_timeout"]) + 1)
        for key in own:
            t = self.targets[key]
            if t.failed:
                self.log(f"{key} failed round {t.failed} seen from this gateway: {t.why}")
        self.gateway_act(own)

    def round_limit(self):
        """Seconds a round may run before its loop counts as stuck: probes, a command, a restart's warm-up."""
        c = self.config
        return (float(c["interval"]) + float(c["probe_timeout"]) + float(c["canary_timeout"]) + COMMAND_TIMEOUT
                + 2 * float(c["warm_timeout"]) + 30)

    def start(self):
        interval, limit = float(self.config["interval"]), self.round_limit()
        if self.config.get("local"):
            for target, inst in self.local_targets():
                self.loops.append(hs.Loop(f"local:{target.key}", lambda t=target, i=inst: self.local_round(t, i),
                                          interval, limit, self.stop, "herd-guard"))
        if self.config.get("gateway"):
            self.loops.append(hs.Loop("gateway", self.gateway_round, interval, limit, self.stop, "herd-guard"))
        return [loop.start() for loop in self.loops]

    def live(self):
        """True while every loop is live (what the systemd watchdog is pinged on)."""
        return bool(self.loops) and all(loop.live() for loop in self.loops)

    # -- metrics ---------------------------------------------------------------------------------------------
    def metrics(self):
        lines = hs.loop_metrics("herd_guard", self.loops) + [
            "# HELP herd_guard_canaries_total Canary results by instance (pass, fail, busy).",
            "# TYPE herd_guard_canaries_total counter",
        ]
        targets = sorted(self.targets.items())
        for key, t in targets:
            for result, n in sorted(t.counts.items()):
                lines.append(f'herd_guard_canaries_total{{server="{escape(key)}",result="{result}"}} {n}')
        lines += ["# HELP herd_guard_failed_rounds Failed rounds in a row by instance.",
                  "# TYPE herd_guard_failed_rounds gauge"]
        lines += [f'herd_guard_failed_rounds{{server="{escape(k)}"}} {t.failed}' for k, t in targets]
        if self.config.get("gateway"):
            lines += ["# HELP herd_guard_drained 1 while herd-guard holds the instance drained on this gateway.",
                      "# TYPE herd_guard_drained gauge"]
            lines += [f'herd_guard_drained{{server="{escape(k)}"}} {int(k in self.drained)}' for k, _t in targets]
        lines += ["# HELP herd_guard_actions_total Actions taken by instance and kind.",
                  "# TYPE herd_guard_actions_total counter"]
        with self.lock:
            actions = dict(self.actions)
        kinds = (LOCAL_ACTIONS if self.config.get("local") else ()) + (GATEWAY_ACTIONS if self.config.get("gateway") else ())
        for key, _t in targets:
            for action in kinds:
                lines.append(f'herd_guard_actions_total{{server="{escape(key)}",action="{action}"}} {actions.get((key, action), 0)}')
        lines += self.state_metrics()
        return "\n".join(lines) + "\n"

    def state_metrics(self):
        """The gateway's view this guard publishes for the other guards (GATEWAY_SERIES), the gateways it reads,
        and the restart cap."""
        lines = []
        with self.views_lock:
            views = dict(self.views)
        own = views.get(self.config["host"]) if self.config.get("gateway") else None
        for field, metric, text in GATEWAY_SERIES if own is not None else ():
            lines += [f"# HELP {metric} {text}", f"# TYPE {metric} gauge"]
            for key, inst in sorted(own.items()):
                value = inst[field]
                if field == "age" and value is None:
                    continue
                value = int(bool(value)) if field in ("drained", "last") else value
                lines.append(f'{metric}{{server="{escape(key)}"}} {value}')
        lines += ["# HELP herd_guard_gateway_up 1 when the gateway's view (its /herd/pools, or its guard) was read last round.",
                  "# TYPE herd_guard_gateway_up gauge"]
        lines += [f'herd_guard_gateway_up{{gateway="{escape(name)}"}} {int(view is not None)}' for name, view in sorted(views.items())]
        if self.config.get("local"):
            now = self.clock()
            with self.lock:
                recent = len([t for t, _k in self.history if now - t < 3600])
            lines += ["# HELP herd_guard_restarts_last_hour Restarts of this host's instances within the last hour.",
                      "# TYPE herd_guard_restarts_last_hour gauge", f"herd_guard_restarts_last_hour {recent}",
                      "# HELP herd_guard_restart_capped 1 while guard_restart_max_per_hour stops further restarts.",
                      "# TYPE herd_guard_restart_capped gauge", f"herd_guard_restart_capped {int(self.capped)}"]
        return lines


def serve(guard, config):
    """The /metrics server (herd_service.metrics_server)."""
    return hs.metrics_server(config, guard.metrics, "herd-guard")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Active health of herd's Ollama instances")
    parser.add_argument("--config", default="/etc/herd/guard.json")
    parser.add_argument("--check", action="store_true", help="only check the config file and exit")
    args = parser.parse_args(argv)
    config = hs.read_config(args.config, check_config, "herd-guard", load=load_config)
    if config is None:
        return 2
    if args.check:
        return 0
    guard = Guard(config)
    server = serve(guard, config)
    guard.start()
    hs.Watchdog(guard.live, guard.stop, service="herd-guard").start()
    duties = [d for d in ("local", "gateway") if config.get(d)]
    print(f"herd-guard: {' and '.join(duties)} duty, {len(guard.targets)} instances known, /metrics on "
          f"{config['listen_address']}:{config['port']}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        guard.stop.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
