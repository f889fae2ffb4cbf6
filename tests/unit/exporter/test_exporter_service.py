"""herd-exporter as a service (roles/exporter/files/herd_exporter.py on herd_service): a scrape storm costs one
reading of the GPUs and of each instance, its /metrics holds no thread per idle socket, its log poll loop survives a
round that raises."""

import socket
import threading
import time
import urllib.request

import herd_service as hs
import pytest
from conftest import fixture_text


class _Counting:
    """Stands in for nvidia-smi and the instances' /api/ps: counts the calls; each takes a while (a real fork)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.smi = 0
        self.fetches = {}

    def run_smi(self, _binary, _timeout):
        with self.lock:
            self.smi += 1
        time.sleep(0.2)
        return fixture_text("nvidia-smi-query.csv")

    def fetch(self, url, _timeout):
        with self.lock:
            self.fetches[url] = self.fetches.get(url, 0) + 1
        time.sleep(0.05)
        return fixture_text("api_ps.json")


def _config(cache_seconds, **over):
    config = {"host": "gpu1", "listen_address": "127.0.0.1", "port": 0, "timeout": 2, "buckets": [1],
              "cache_seconds": cache_seconds, "http_timeout": 2, "http_workers": 4, "http_max_connections": 256,
              "nvidia_smi": "/usr/bin/nvidia-smi", "gateway": None,
              "instances": [{"id": i, "port": 18951 + i, "local_url": f"http://127.0.0.1:{18951 + i}",
                             "gpu_uuids": [], "num_parallel": 1, "max_queue": 1} for i in (0, 1)]}
    config.update(over)
    return config


@pytest.fixture
def serving(ex, run_server):
    def start(config, counting):
        exporter = ex.Exporter(config, fetch=counting.fetch, smi=counting.run_smi)
        server = run_server(ex.serve(exporter, config))
        return f"http://127.0.0.1:{server.server_address[1]}/metrics"

    return start


def _storm(url, n):
    """n scrapes at once; their bodies."""
    bodies, errors = [], []

    def scrape():
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                bodies.append(answer.read().decode())
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not errors, errors[:3]
    return bodies


def test_a_scrape_storm_costs_one_nvidia_smi_run_and_one_probe_per_instance(serving):
    counting = _Counting()
    bodies = _storm(serving(_config(cache_seconds=5), counting), 20)
    assert len(bodies) == 20 and all('herd_gpu_utilization_percent{' in b for b in bodies)
    assert counting.smi == 1
    assert sorted(counting.fetches.values()) == [1, 1]
    assert 'herd_exporter_readings_total{host="gpu1",reading="gpu"} 1\n' in bodies[-1]


def test_without_the_cache_every_scrape_reads(serving):
    """The control: cache_seconds 0, and 8 scrapes fork nvidia-smi 8 times."""
    counting = _Counting()
    _storm(serving(_config(cache_seconds=0), counting), 8)
    assert counting.smi == 8


def test_a_reading_is_taken_again_after_cache_seconds():
    clock = [0.0]
    calls = []
    cached = hs.Cached(lambda: calls.append(1) or len(calls), 2, clock=lambda: clock[0])
    assert cached.get() == 1 and cached.get() == 1
    clock[0] = 1.9
    assert cached.get() == 1
    clock[0] = 2.0
    assert cached.get() == 2


def test_a_failed_reading_is_shared_too():
    """nvidia-smi failing under a storm is run once per interval, not once per scrape."""
    calls = []

    def failing():
        calls.append(1)
        raise RuntimeError("nvidia-smi exited 9")

    cached = hs.Cached(failing, 5)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            cached.get()
    assert len(calls) == 1


def test_idle_sockets_hold_no_thread_and_metrics_answers(serving):
    url = serving(_config(cache_seconds=5), _Counting())
    port = int(url.split(":")[2].split("/")[0])
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(200)]
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.status == 200
        assert threading.active_count() <= threads + 4  # the workers, not one thread per socket
    finally:
        for s in idle:
            s.close()


def test_the_log_poll_loop_survives_a_round_that_raises(ex, tmp_path):
    exporter = ex.Exporter(_config(cache_seconds=0, nvidia_smi="", instances=[]))
    rounds = []

    def poll():
        rounds.append(1)
        if len(rounds) % 2:
            raise OSError("log unreadable")

    stop = threading.Event()
    loop = hs.Loop("log_poll", poll, 0.01, 60, stop, "herd-exporter")
    exporter.loops.append(loop)
    loop.start()
    try:
        deadline = time.monotonic() + 5
        while len(rounds) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(rounds) >= 6 and loop.live()
        text = ex.render(exporter.collect())
        assert 'herd_exporter_loop_up{host="gpu1",loop="log_poll"} 1' in text
        assert 'herd_exporter_round_errors_total{host="gpu1",loop="log_poll"} ' in text
        assert loop.errors >= 3
    finally:
        stop.set()
