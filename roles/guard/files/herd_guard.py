#!/usr/bin/python3
"""herd guard: active health of Ollama instances (canaries), with one owner for the actions they trigger.

Every few seconds each instance gets a liveness probe (GET /api/ps, short timeout) and, while a model is
loaded, a canary: a 1-token /api/generate of that model with its own timeout, in the background so that a hung
canary never delays the liveness probes (its keep_alive is the time the model has left, so that canaries never
keep an idle model loaded). An instance is failing while its probes fail in a row, or its
canaries do (an instance that answers /api/ps but never generates, ollama issues 1378 and 15950); an answer
"server busy" (503) is neither a pass nor a failure. Two duties, by the host's config:

- local (GPU hosts): after `restart_failures` failed rounds in a row (more than `failures`, so that the
  gateways drain the instance first) the instance's unit (systemctl restart) or
  container (docker restart) is restarted, at most once per `restart_interval` seconds, and the guard waits
  until it is warm again (answers, and a canary of the models it had loaded passes).
- gateway (gateway hosts): every instance in the gateway's record (servers.json) is probed; after `failures`
  failed rounds it is drained on this gateway through the drain command, unless it is the last instance
  in rotation of a pool (instances holding the same model), so that a pool is never emptied; after `passes` good rounds in a row it is undrained.
  The guard only undrains what it drained itself (kept in `state_file`, so a restart of the guard forgets
  nothing); servers an operator drained are left alone.

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
import subprocess
import sys
import threading
import time
import urllib.error
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
    for key in ("interval", "probe_timeout", "canary_timeout", "warm_timeout", "restart_interval"):
        if float(config[key]) <= 0:
            raise ValueError(f"{key} must be above 0")
    for key in ("failures", "restart_failures", "passes"):
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
        for key in ("servers_file", "drained_file", "drain_command", "state_file"):
            if not str(gateway[key]).startswith("/"):
                raise ValueError(f"gateway.{key} must be an absolute path")
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


def is_drained(key, host, drained):
    """Whether the gateway's drained record (targets "host" or "host:id") names this server."""
    return key in drained or host in drained


def pools_of(server):
    """Pools a server belongs to: its models, or the one pool "*" of servers that serve any model."""
    return list(server.get("models") or []) or ["*"]


def in_pool(server, pool):
    """A server without a model list serves every model, so it is in every pool."""
    return pool == "*" or not server.get("models") or pool in server["models"]


def last_healthy_pools(key, servers, unhealthy):
    """Pools in which server `key` is the only one not in `unhealthy` (a set of keys): draining it empties them."""
    me = next(s for s in servers if s["key"] == key)
    return [pool for pool in pools_of(me)
            if not [s for s in servers if s["key"] != key and s["key"] not in unhealthy and in_pool(s, pool)]]


# ---------------------------------------------------------------------------------------------------------
# Probes


def _request(url, timeout, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http to the plan's instances only
        return resp.status, resp.read(1 << 20)


def probe(base, timeout):
    """(ok, {loaded model: seconds until it unloads or None}, why) from GET /api/ps."""
    try:
        status, body = _request(base + "/api/ps", timeout)
        return status == 200, expiries(body), f"/api/ps answered {status}"
    except (OSError, ValueError) as exc:
        return False, {}, f"/api/ps: {exc}"


def canary(base, model, timeout, keep_alive=None):
    """'pass', 'busy' or 'fail', and why: a 1-token generate of a loaded model (keep_alive: see canary_keep_alive)."""
    body = {"model": model, "prompt": "ok", "stream": False, "options": {"num_predict": 1}}
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    try:
        status, answer = _request(base + "/api/generate", timeout, body)
        if status == 200 and json.loads(answer).get("done") is True:
            return "pass", "generated"
        return "fail", f"generate answered {status}"
    except urllib.error.HTTPError as exc:
        return ("busy" if exc.code == 503 else "fail"), f"generate answered {exc.code}"
    except (OSError, ValueError) as exc:
        return "fail", f"generate: {exc}"


# ---------------------------------------------------------------------------------------------------------
# State of one instance


class Target:
    """Probe results of one instance; the canary runs in its own thread."""

    def __init__(self, key, base, models, config):
        self.key, self.base, self.models = key, base, list(models)
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
        self.why = ""
        self.counts = {"pass": 0, "fail": 0, "busy": 0}

    def _run_canary(self, model, keep_alive):
        result, why = canary(self.base, model, float(self.config["canary_timeout"]), keep_alive)
        with self.lock:
            self.counts[result] += 1
            self.canary_result = (result, why)

    def round(self):
        """One liveness probe, and a canary started when none is running. Returns (healthy, why).

        `failed` counts the later of two streaks: liveness probes failed in a row, and canaries failed in a row
        (a canary takes up to canary_timeout, so it spans rounds; "busy" neither breaks nor extends its streak).
        """
        ok, expiry, why = probe(self.base, float(self.config["probe_timeout"]))
        loaded = list(expiry)
        with self.lock:
            self.loaded = loaded or self.loaded
            result = self.canary_result
            self.canary_result = None
            running = self.canary_thread is not None and self.canary_thread.is_alive()
        if ok and loaded and not running:
            model = next((m for m in loaded if m in self.models), loaded[0])
            keep_alive = canary_keep_alive(expiry[model])
            if keep_alive != "skip":
                self.canary_thread = threading.Thread(target=self._run_canary, args=(model, keep_alive), daemon=True)
                self.canary_thread.start()
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
            self.failed = max(self.live_failed, self.canary_failed)
            healthy = self.failed == 0
            if not healthy:
                why = why if not ok else self.canary_why
            self.passed, self.why = (self.passed + 1, "") if healthy else (0, why)
        return healthy, why

    def reset(self):
        with self.lock:
            self.failed = self.live_failed = self.canary_failed = self.passed = 0
            self.why, self.canary_result = "", None


# ---------------------------------------------------------------------------------------------------------
# The guard


class Guard:
    def __init__(self, config, run=subprocess.run, clock=time.monotonic, sleep=time.sleep):
        self.config = config
        self.run, self.clock, self.sleep = run, clock, sleep
        self.lock = threading.Lock()
        self.actions = {}
        self.targets = {}
        self.last_restart = {}
        self.drained = set()
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

    # -- local duty ------------------------------------------------------------------------------------------
    def local_targets(self):
        local = self.config.get("local") or {}
        out = []
        for inst in local.get("instances", []):
            key = f"{self.config['host']}:{inst['id']}"
            if key not in self.targets:
                self.targets[key] = Target(key, str(inst["local_url"]).rstrip("/"), inst.get("models", []), self.config)
            out.append((self.targets[key], inst))
        return out

    def restart(self, target, inst):
        mode = self.config["local"]["mode"]
        now = self.clock()
        if now - self.last_restart.get(target.key, -1e9) < float(self.config["restart_interval"]):
            return
        self.last_restart[target.key] = now
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
    def gateway_servers(self):
        gateway = self.config["gateway"]
        servers = self._read_json(gateway["servers_file"], {}).get("servers", [])
        for s in servers:
            if s["key"] not in self.targets:
                self.targets[s["key"]] = Target(s["key"], f"http://{s['endpoint']}", s.get("models", []), self.config)
        return servers

    def save_drained(self):
        path = self.config["gateway"]["state_file"]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(sorted(self.drained), fh)
            fh.write("\n")
        os.replace(tmp, path)

    def gateway_act(self, servers):
        gateway = self.config["gateway"]
        record = set(self._read_json(gateway["drained_file"], []))
        operator = {s["key"] for s in servers if is_drained(s["key"], s["host"], record) and s["key"] not in self.drained}
        failing = {s["key"] for s in servers if self.targets[s["key"]].failed >= int(self.config["failures"])}
        for s in servers:
            key, target = s["key"], self.targets[s["key"]]
            if key in operator:
                continue
            if key in failing and key not in self.drained:
                # Never empty a pool: some other instance of each of its pools must stay in rotation.
                lonely = last_healthy_pools(key, servers, self.drained | operator)
                if lonely:
                    if target.failed == int(self.config["failures"]):
                        self.count(key, "drain_refused")
                        self.log(f"keep {key} in the gateway although it failed {target.failed} rounds ({target.why}): "
                                 f"it is the last healthy instance of pool {', '.join(lonely)}")
                    continue
                self.log(f"drain {key}: {target.failed} failed rounds in a row, last: {target.why}")
                ok, out = self.command([gateway["drain_command"], "drain", key])
                if ok:
                    self.drained.add(key)
                    self.save_drained()
                    self.count(key, "drain")
                else:
                    self.count(key, "drain_failed")
                    self.log(f"drain of {key} failed: {out}")
            elif key in self.drained and target.passed >= int(self.config["passes"]):
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
        healthy, why = target.round()
        if not healthy:
            self.log(f"{target.key} failed round {target.failed}: {why}")
            if target.failed >= int(self.config["restart_failures"]):
                self.restart(target, inst)

    def gateway_round(self):
        servers = self.gateway_servers()
        threads = [threading.Thread(target=hs.guarded(self.targets[s["key"]].round), daemon=True) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(float(self.config["probe_timeout"]) + 1)
        for s in servers:
            t = self.targets[s["key"]]
            if t.failed:
                self.log(f"{s['key']} failed round {t.failed} seen from this gateway: {t.why}")
        self.gateway_act(servers)

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
        return "\n".join(lines) + "\n"


def serve(guard, config):
    """The /metrics server (herd_service.MetricsServer: timeouts, bounded workers, IPv4 or IPv6)."""
    return hs.MetricsServer(config["listen_address"], config["port"], hs.metrics_handler(guard.metrics, "herd-guard"),
                            **hs.http_settings(config))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Active health of herd's Ollama instances")
    parser.add_argument("--config", default="/etc/herd/guard.json")
    parser.add_argument("--check", action="store_true", help="only check the config file and exit")
    args = parser.parse_args(argv)
    try:
        config = check_config(load_config(args.config))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"herd-guard: bad config {args.config}: {exc}", file=sys.stderr)
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
