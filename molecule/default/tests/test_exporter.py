"""All-in-one host: herd-exporter runs hardened, /metrics is valid exposition, and its numbers move under load."""

import json
import os
import sys
import time

import pytest

PROJECT = os.environ["MOLECULE_PROJECT_DIRECTORY"]
sys.path.insert(0, os.path.join(PROJECT, "tests", "unit", "exporter"))
import promcheck  # noqa: E402

GPUS = json.load(open(os.path.join(PROJECT, "lab/gpus/l20x4.json")))["gpus"]
BASE_PORT = 11434
MODEL = "herd-tiny:1b"
URL = "http://127.0.0.1:9855/metrics"


def journal(host):
    return host.run("journalctl -u herd-exporter -n 40 --no-pager").stdout


def scrape(host):
    out = host.run(f"curl -sS -D /tmp/exporter-headers -o /tmp/exporter-metrics {URL}")
    assert out.rc == 0, out.stderr + journal(host)
    headers = host.file("/tmp/exporter-headers").content_string
    assert " 200 " in headers.splitlines()[0]
    assert "text/plain; version=0.0.4" in headers
    text = host.file("/tmp/exporter-metrics").content_string
    try:
        return promcheck.parse(text)
    except promcheck.FormatError as exc:
        pytest.fail(f"/metrics is not valid exposition: {exc}\n{text[:3000]}")


def test_exporter_runs_hardened_as_a_dynamic_user(host):
    svc = host.service("herd-exporter")
    assert svc.is_enabled
    assert svc.is_running, journal(host)
    assert host.socket("tcp://0.0.0.0:9855").is_listening
    props = host.run(
        "systemctl show herd-exporter -p DynamicUser -p ProtectSystem -p NoNewPrivileges -p MainPID"
    ).stdout
    assert "DynamicUser=yes" in props and "ProtectSystem=strict" in props and "NoNewPrivileges=yes" in props
    pid = [line.split("=", 1)[1] for line in props.splitlines() if line.startswith("MainPID=")][0]
    uid = host.run(f"awk '/^Uid:/ {{print $2}}' /proc/{pid}/status").stdout.strip()
    assert uid and uid != "0", "the exporter must not run as root"


def test_metrics_describe_every_planned_instance_and_gpu(host):
    fams = scrape(host)
    value = promcheck.sample_value
    for i, gpu in enumerate(GPUS):
        labels = {"host": "herd-mol-aio", "instance_id": str(i), "port": str(BASE_PORT + i), "gpu_uuid": gpu["uuid"]}
        assert value(fams, "herd_instance_up", **labels) == 1, journal(host)
        assert value(fams, "herd_instance_models_loaded", **labels) >= 1
        assert value(fams, "herd_instance_model_vram_bytes", model=MODEL, **labels) > 0
        assert value(fams, "herd_instance_num_parallel", **labels) == 2
        gpu_labels = {"gpu": str(gpu["index"]), "gpu_uuid": gpu["uuid"], "instance_id": str(i)}
        assert value(fams, "herd_gpu_memory_total_bytes", **gpu_labels) == gpu["memory_total_mib"] * 1024 * 1024
        assert len([s for s in fams["herd_gpu_utilization_percent"]["samples"] if s[1]["gpu_uuid"] == gpu["uuid"]]) == 1
    assert value(fams, "herd_instance_up") == len(GPUS)
    for collector in ("instances", "gpu", "gateway_log", "gateway_status", "gateway_pools"):
        assert value(fams, "herd_exporter_collector_success", collector=collector) == 1, collector
    # the gateway's model pools (/herd/pools): the lab's model has its pool and wait queue
    assert value(fams, "herd_gateway_pools_available") == 1
    assert value(fams, "herd_gateway_pool_queue_max", pool=MODEL) > 0
    assert value(fams, "herd_gateway_capacity_requests") == 2 * len(GPUS)


def test_gateway_counters_and_histograms_move_with_requests(host):
    before = scrape(host)
    value = promcheck.sample_value
    n = 2 * len(GPUS)
    reported = {"prompt": 0, "output": 0}
    for i in range(n):  # distinct prompts: affinity keeps one repeated prompt on one instance
        out = host.run(
            "curl -sS -o /tmp/exporter-answer -w '%{http_code}' http://127.0.0.1/api/generate "
            f"""-d '{{"model":"{MODEL}","prompt":"count {i}","stream":{'true' if i % 2 else 'false'},"""
            """"options":{"num_predict":4}}'"""
        )
        assert out.stdout == "200"
        final = json.loads(host.file("/tmp/exporter-answer").content_string.strip().splitlines()[-1])
        reported["prompt"] += final["prompt_eval_count"]
        reported["output"] += final["eval_count"]
    deadline = time.monotonic() + 10
    while True:
        after = scrape(host)
        grown = value(after, "herd_gateway_requests_total", status="200") - value(
            before, "herd_gateway_requests_total", status="200"
        )
        if grown >= n or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grown == n, journal(host)
    count = "herd_gateway_request_duration_seconds_count"
    assert value(after, count) - value(before, count) == n
    # the pool's own counters (the gateway's, read at the scrape) counted every request and its wait
    admitted = "herd_gateway_pool_admitted_total"
    assert value(after, admitted, pool=MODEL) - value(before, admitted, pool=MODEL) == n
    waits = "herd_gateway_pool_wait_seconds_count"
    assert value(after, waits, pool=MODEL) - value(before, waits, pool=MODEL) == n
    assert value(after, "herd_gateway_upstream_header_duration_seconds_sum") > value(
        before, "herd_gateway_upstream_header_duration_seconds_sum"
    )
    # Token accounting (issue 30): the gateway read each answer's usage (streamed or not) into its access log, the
    # exporter summed it per key (none: this lab has no API keys) and model: exactly what the instances reported.
    for kind in ("prompt", "output"):
        labels = {"key": "none", "model": MODEL, "type": kind}
        grown = value(after, "herd_gateway_tokens_total", **labels) - value(before, "herd_gateway_tokens_total", **labels)
        assert grown == reported[kind], (kind, grown, reported)
    requests = "herd_gateway_key_requests_total"
    labels = {"key": "none", "model": MODEL, "status": "200"}
    assert value(after, requests, **labels) - value(before, requests, **labels) == n
    ttft = "herd_gateway_time_to_first_token_seconds_count"
    assert value(after, ttft, model=MODEL) - value(before, ttft, model=MODEL) == n // 2
    # Every answer is attributed to a planned instance (least loaded spread the distinct prompts over several).
    served = {
        s[1]["instance_id"]
        for s in after["herd_gateway_requests_total"]["samples"]
        if s[1]["status"] == "200" and s[1]["upstream"] != "none"
    }
    assert served and served <= {str(i) for i in range(len(GPUS))}
    assert len(served) > 1


def test_in_flight_follows_streaming_load(host):
    # Slow streamed answers through the gateway, bounded by curl's own time limit.
    host.run(
        "for i in 1 2 3 4 5 6; do (curl -sS -m 20 -o /dev/null http://127.0.0.1/api/generate "
        f"""-d '{{"model":"{MODEL}","prompt":"hi","options":{{"num_predict":700}}}}' &) ; done"""
    )
    seen = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and seen == 0:
        seen = promcheck.sample_value(scrape(host), "herd_gateway_requests_in_flight")
        time.sleep(0.3)
    assert seen >= 1, "herd_gateway_requests_in_flight stayed 0 while streams ran"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if promcheck.sample_value(scrape(host), "herd_gateway_requests_in_flight") == 0:
            break
        time.sleep(1)
    assert promcheck.sample_value(scrape(host), "herd_gateway_requests_in_flight") == 0
