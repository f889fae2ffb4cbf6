"""herd_service: what every herd service shares (herd-exporter, herd-guard). Standard library only.

- load_config: the service's JSON config, without the leading '#' lines of Ansible's managed comment;
- escape: a Prometheus label value; format_value: a sample value;
- MetricsServer: the HTTP server of /metrics. IPv4 or IPv6 (`::` listens on every address of both families).
  One selector thread owns every connection and reads requests without blocking; a request goes to a worker
  only once it is complete, so idle or slow clients hold a socket but never a thread. A connection that has not
  sent a whole request head within `timeout` seconds is closed; so is the oldest one when more than
  `max_connections` are open. At most `workers` requests are answered at once, each answer written within
  `timeout` seconds; one answer per connection (Connection: close).
- Loop: a background loop whose rounds each run inside their own error handling (counted, logged, the loop goes
  on); it is live while its thread runs and its current round is younger than its `limit`.
- Watchdog: systemd's notify protocol (READY=1, WATCHDOG=1) over $NOTIFY_SOCKET, a plain datagram socket; the
  watchdog is pinged only while every loop is live, so a dead or stuck loop gets the service restarted
  (WatchdogSec= in its unit).
- Cached: one reading shared by every caller for `seconds`; concurrent callers wait for the one reading.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import selectors
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
MAX_REQUEST_HEAD = 8192
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}


# ---------------------------------------------------------------------------------------------------------
# Config and exposition


def strip_comments(text):
    """Config text without leading '#' lines (the rendered file starts with Ansible's managed comment)."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def load_config(path):
    """The JSON object in `path` (ValueError when it is not an object)."""
    with open(path, encoding="utf-8") as handle:
        config = json.loads(strip_comments(handle.read()))
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the config must be a JSON object")
    return config


def read_config(path, check, name, load=load_config):
    """check(load(path)): the service's checked config, or None after saying on stderr why it is bad (the service
    then exits 2)."""
    try:
        return check(load(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{name}: bad config {path}: {exc}", file=sys.stderr)
        return None


def check_listen(config):
    """Raise ValueError unless listen_address is an IP address and port a TCP port; positive http limits."""
    address = str(config.get("listen_address", ""))
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address.strip("[]"))
    except OSError as exc:
        raise ValueError(f"listen_address {address!r} is not an IPv4 or IPv6 address") from exc
    if not 0 < int(config["port"]) < 65536:
        raise ValueError(f"port {config['port']} is not a TCP port (1-65535)")
    for key in ("http_timeout", "http_workers", "http_max_connections"):
        if key in config and not float(config[key]) > 0:
            raise ValueError(f"{key} must be above 0")
    return config


def escape(value):
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value):
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def log(name, text):
    print(f"{name}: {text}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# HTTP


def parse_request_head(head):
    """(method, path) of a request head, or raise ValueError."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"bad request line {line[:100]!r}")
    return parts[0], parts[1].split("?", 1)[0]


def response(code, body, content_type=TEXT, head_only=False):
    head = (f"HTTP/1.1 {code} {REASONS.get(code, 'Error')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


class MetricsServer:
    """HTTP server of a herd service: `handle(path) -> (code, content_type, body bytes)` answers each GET.

    serve_forever() runs the selector loop in the calling thread; shutdown() ends it from another thread.
    """

    def __init__(self, address, port, handle, timeout=5.0, workers=4, max_connections=256, clock=time.monotonic):
        address = str(address).strip("[]")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and address == "::":
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # every IPv4 address too
            self.sock.bind((address, int(port)))
            self.sock.listen(128)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.server_address = self.sock.getsockname()
        self.handle, self.timeout, self.clock = handle, float(timeout), clock
        self.max_connections = int(max_connections)
        self.pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="http")
        self.selector = selectors.DefaultSelector()
        self.conns = collections.OrderedDict()  # socket -> [deadline, bytes read]; oldest first
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.stats = {"answered": 0, "timed_out": 0, "evicted": 0, "bad": 0}

    def serve_forever(self):
        self.selector.register(self.sock, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping.is_set():
                for key, _events in self.selector.select(timeout=0.5):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "read":
                        self._read(key.fileobj)
                self._expire()
        finally:
            for conn in list(self.conns):
                self._drop(conn)
            self.selector.close()
            self.stopped.set()

    def shutdown(self):
        self.stopping.set()
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass
        self.stopped.wait(5)

    def server_close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        for sock in (self.sock, self.wake_r, self.wake_w):
            sock.close()

    # -- connections -----------------------------------------------------------------------------------------
    def _accept(self):
        while True:
            try:
                conn, _peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: try again on the next readiness
                return
            conn.setblocking(False)
            self.conns[conn] = [self.clock() + self.timeout, b""]
            self.selector.register(conn, selectors.EVENT_READ, "read")
            while len(self.conns) > self.max_connections:
                oldest = next(iter(self.conns))
                self.stats["evicted"] += 1
                self._drop(oldest)

    def _drop(self, conn):
        self.conns.pop(conn, None)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _expire(self):
        now = self.clock()
        for conn, (deadline, _data) in list(self.conns.items()):
            if now >= deadline:
                self.stats["timed_out"] += 1
                self._drop(conn)

    def _read(self, conn):
        state = self.conns.get(conn)
        if state is None:
            return
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        state[1] += chunk
        data = state[1]
        if b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) > MAX_REQUEST_HEAD:
                self._hand_over(conn, None)
            return
        self._hand_over(conn, data)

    def _hand_over(self, conn, head):
        """The request is complete: a worker answers it (the selector forgets the socket)."""
        self.conns.pop(conn, None)
        self.selector.unregister(conn)
        try:
            self.pool.submit(self._answer, conn, head)
        except RuntimeError:  # shutting down
            conn.close()

    def _answer(self, conn, head):
        try:
            conn.setblocking(True)
            conn.settimeout(self.timeout)  # sendall: the whole answer within the timeout
            if head is None:
                self.stats["bad"] += 1
                conn.sendall(response(431, b"request head too large\n"))
                return
            try:
                method, path = parse_request_head(head)
            except ValueError:
                self.stats["bad"] += 1
                conn.sendall(response(400, b"bad request\n"))
                return
            if method not in ("GET", "HEAD"):
                conn.sendall(response(405, b"only GET\n"))
                return
            try:
                code, ctype, body = self.handle(path)
            except Exception as exc:  # noqa: BLE001 - a failed handler answers 500 with the reason
                code, ctype, body = 500, TEXT, f"failed: {exc}\n".encode()
            conn.sendall(response(code, body, ctype, head_only=method == "HEAD"))
            self.stats["answered"] += 1
        except OSError:
            pass
        finally:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def metrics_handler(render, name):
    """A MetricsServer handle(): `render()` on /metrics, a pointer on /, 404 elsewhere."""
    def handle(path):
        if path == "/metrics":
            return 200, CONTENT_TYPE, render().encode()
        if path == "/":
            return 200, TEXT, f"{name}: metrics at /metrics\n".encode()
        return 404, TEXT, b"not found\n"
    return handle


def http_settings(config):
    """MetricsServer keyword arguments from a service config (http_timeout, http_workers, http_max_connections)."""
    return {"timeout": float(config.get("http_timeout", 5)), "workers": int(config.get("http_workers", 4)),
            "max_connections": int(config.get("http_max_connections", 256))}


def metrics_server(config, render, name):
    """The service's /metrics server (MetricsServer: timeouts, bounded workers, IPv4 or IPv6) on the config's
    listen_address and port, with its http limits; `render()` gives the exposition text."""
    return MetricsServer(config["listen_address"], config["port"], metrics_handler(render, name), **http_settings(config))


# ---------------------------------------------------------------------------------------------------------
# Loops and systemd's watchdog


_current = threading.local()


def beat():
    """Called inside a round that legitimately takes long (a command, a restart): the round is making progress."""
    loop = getattr(_current, "loop", None)
    if loop is not None:
        loop.beat()


def guarded(fn):
    """fn for a helper thread started inside a round: its exception counts as an error of that round's loop."""
    loop = getattr(_current, "loop", None)

    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - counted and logged like a failed round
            if loop is None:
                raise
            loop.failed(exc)
            return None

    return run


class Loop:
    """A loop of rounds in its own thread: run `round_fn()` every `interval` seconds until `stop` is set.

    Every round runs inside its own error handling: an exception is counted (errors), logged with its traceback
    and the loop goes on with the next round. live() is false once the thread has ended, or while a round has run
    longer than `limit` seconds (a stuck round)."""

    def __init__(self, name, round_fn, interval, limit, stop, service="herd", clock=time.monotonic):
        self.name, self.round_fn, self.interval, self.limit = name, round_fn, float(interval), float(limit)
        self.stop, self.service, self.clock = stop, service, clock
        self.errors = 0
        self.rounds = 0
        self.round_started = None
        self.thread = None
        self.lock = threading.Lock()

    def run_round(self):
        """One round inside its own error handling; True when it ended without an exception."""
        with self.lock:
            self.round_started = self.clock()
        _current.loop = self
        try:
            self.round_fn()
            return True
        except Exception as exc:  # noqa: BLE001 - a round's failure must never end the loop
            self.failed(exc)
            return False
        finally:
            _current.loop = None
            with self.lock:
                self.rounds += 1
                self.round_started = None

    def failed(self, exc):
        with self.lock:
            self.errors += 1
        log(self.service, f"loop {self.name}: round failed ({type(exc).__name__}: {exc}); the loop goes on\n"
            + "".join(traceback.format_exception(exc)).rstrip())

    def run(self):
        while not self.stop.is_set():
            started = self.clock()
            self.run_round()
            self.stop.wait(max(0.0, self.interval - (self.clock() - started)))

    def start(self):
        self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self.thread.start()
        return self.thread

    def beat(self):
        """A long round says it is still making progress (restarts its clock)."""
        with self.lock:
            if self.round_started is not None:
                self.round_started = self.clock()

    def live(self):
        if self.thread is None or not self.thread.is_alive():
            return False
        with self.lock:
            started = self.round_started
        return started is None or self.clock() - started <= self.limit


def loop_metrics(prefix, loops):
    """Exposition lines: {prefix}_up (1 while every loop is live), {prefix}_loop_up and
    {prefix}_round_errors_total by loop."""
    live = {loop.name: loop.live() for loop in loops}
    lines = [f"# HELP {prefix}_up 1 while the service runs and every loop of it is live (0: a loop died or is stuck).",
             f"# TYPE {prefix}_up gauge", f"{prefix}_up {int(bool(loops) and all(live.values()))}",
             f"# HELP {prefix}_loop_up 1 while the loop runs and its current round is within its time limit.",
             f"# TYPE {prefix}_loop_up gauge"]
    lines += [f'{prefix}_loop_up{{loop="{escape(n)}"}} {int(v)}' for n, v in sorted(live.items())]
    lines += [f"# HELP {prefix}_round_errors_total Rounds of the loop that raised an error (the loop went on).",
              f"# TYPE {prefix}_round_errors_total counter"]
    lines += [f'{prefix}_round_errors_total{{loop="{escape(loop.name)}"}} {loop.errors}'
              for loop in sorted(loops, key=lambda x: x.name)]
    return lines


def sd_notify(message, env=None):
    """Send `message` to systemd ($NOTIFY_SOCKET, a datagram socket; '@' = abstract). False when there is none."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(message.encode() if isinstance(message, str) else message)
        return True
    except OSError:
        return False


def watchdog_interval(env=None):
    """Seconds between watchdog pings: half of systemd's WatchdogSec ($WATCHDOG_USEC), or None without one."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


class Watchdog:
    """Tells systemd the service is ready, then pings its watchdog every `interval` seconds while `healthy()`."""

    def __init__(self, healthy, stop, interval=None, notify=sd_notify, service="herd"):
        self.healthy, self.stop, self.notify, self.service = healthy, stop, notify, service
        self.interval = watchdog_interval() if interval is None else interval
        self.pings = 0
        self.withheld = 0

    def tick(self):
        """One ping when healthy; True when it was sent."""
        if self.healthy():
            self.notify("WATCHDOG=1")
            self.pings += 1
            return True
        if self.withheld == 0:
            log(self.service, "a loop is dead or stuck: the systemd watchdog is no longer pinged, systemd restarts "
                              "the service")
        self.withheld += 1
        return False

    def run(self):
        while not self.stop.wait(self.interval):
            self.tick()

    def start(self):
        # systemd's watchdog ends a stuck service with SIGABRT: the journal then shows where every thread was.
        faulthandler.enable()
        self.notify("READY=1")
        if self.interval:
            threading.Thread(target=self.run, name="watchdog", daemon=True).start()


# ---------------------------------------------------------------------------------------------------------
# Cache


class Cached:
    """`read()` at most once per `seconds`: every caller within that time gets the same reading (or the same
    error), and callers that arrive while a reading runs wait for it instead of starting their own."""

    def __init__(self, read, seconds, clock=time.monotonic):
        self.read, self.seconds, self.clock = read, float(seconds), clock
        self.lock = threading.Lock()
        self.at = None
        self.value = None
        self.error = None
        self.reads = 0

    def get(self):
        with self.lock:
            if self.at is None or self.seconds <= 0 or self.clock() - self.at >= self.seconds:
                self.reads += 1
                try:
                    self.value, self.error = self.read(), None
                except Exception as exc:  # noqa: BLE001 - the caller sees the same error until the next reading
                    self.value, self.error = None, exc
                self.at = self.clock()
            if self.error is not None:
                raise self.error
            return self.value
