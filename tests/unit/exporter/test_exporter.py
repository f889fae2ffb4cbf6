"""The exporter's parsers (on captured nvidia-smi, nginx and Ollama output), log tailing and exposition."""

import json
import os
import threading
import urllib.error
import urllib.request

import promcheck
import pytest
from conftest import fixture_text

GPU0 = "GPU-c0b5f38c-aa93-57e2-ba94-eab6f62efce1"
GPU1 = "GPU-68b5357d-d53b-5af2-b009-a7734e80979b"


# ------------------------------------------------------------------ parsers


def test_nvidia_smi_rows_and_unsupported_fields(ex):
    gpus = ex.parse_nvidia_smi(fixture_text("nvidia-smi-query.csv"))
    assert [g["index"] for g in gpus] == [0, 1, 2]
    assert gpus[0] == {
        "index": 0,
        "uuid": GPU0,
        "utilization_percent": 87.0,
        "memory_used_mib": 30512.0,
        "memory_total_mib": 46068.0,
    }
    assert gpus[2]["utilization_percent"] is None and gpus[2]["memory_total_mib"] is None


@pytest.mark.parametrize(
    "text",
    ["Unable to determine the device handle for GPU0000:3D:00.0: Unknown Error", "0, GPU-x, 1, 2", ", GPU-x, 1, 2, 3"],
)
def test_nvidia_smi_garbage_is_an_error(ex, text):
    with pytest.raises(ValueError):
        ex.parse_nvidia_smi(text)


def test_stub_status_captured_from_nginx(ex):
    assert ex.parse_stub_status(fixture_text("stub_status.txt")) == {
        "active": 1,
        "accepts": 10,
        "handled": 10,
        "requests": 10,
        "reading": 0,
        "writing": 1,
        "waiting": 0,
    }
    with pytest.raises(ValueError):
        ex.parse_stub_status("<html>403 Forbidden</html>")


def test_api_ps(ex):
    models = ex.parse_ps(fixture_text("api_ps.json"))
    assert [(m["name"], m["size"], m["size_vram"]) for m in models] == [
        ("mistral:latest", 5137025024, 5137025024),
        ("qwen2.5:7b", 6654289920, 4831838208),
    ]
    assert ex.parse_ps('{"models": []}') == []
    with pytest.raises(ValueError):
        ex.parse_ps('{"error": "not found"}')


def test_log_lines_captured_from_nginx(ex):
    records = [ex.parse_log_line(line) for line in fixture_text("gateway-access.log").splitlines()]
    assert all(records)
    first, retried, _, forbidden, _, no_live = records[:6]
    assert first["upstream"] == "127.0.0.1:18951" and first["status"] == "200"
    assert first["request_time"] == pytest.approx(0.054) and first["header_time"] == pytest.approx(0.054)
    # A retry: the answer came from the last server; both tries are kept with their own status.
    assert retried["upstream"] == "127.0.0.1:18951" and retried["header_time"] == pytest.approx(0.052)
    assert retried["attempts"] == [("127.0.0.1:18959", "502"), ("127.0.0.1:18951", "200")]
    # No instance asked (403 at the gateway) and no live upstream (nginx writes the group's name).
    assert forbidden["upstream"] == "" and forbidden["status"] == "403" and forbidden["header_time"] is None
    assert no_live["upstream"] == "" and no_live["status"] == "502" and no_live["attempts"] == []
    assert ex.parse_log_line("not json") is None
    assert ex.parse_log_line('{"no": "status"}') is None


# ------------------------------------------------------------------ log tailing


def test_tailer_starts_at_the_end_and_keeps_partial_lines(ex, tmp_path):
    log = tmp_path / "access.log"
    log.write_text('{"status":"200"}\n')
    tail = ex.LogTailer(str(log))
    assert tail.read_lines() == []
    with open(log, "a") as handle:
        handle.write('{"status":"201"}\n{"status":')
    assert tail.read_lines() == ['{"status":"201"}']
    with open(log, "a") as handle:
        handle.write('"202"}\n')
    assert tail.read_lines() == ['{"status":"202"}']


def test_tailer_follows_rename_rotation_without_losing_lines(ex, tmp_path):
    log = tmp_path / "access.log"
    log.write_text("")
    tail = ex.LogTailer(str(log))
    with open(log, "a") as handle:
        handle.write("a\n")
    os.rename(log, tmp_path / "access.log.1")
    # nginx keeps writing the renamed file until it reopens its logs.
    with open(tmp_path / "access.log.1", "a") as handle:
        handle.write("b\n")
    assert tail.read_lines() == ["a", "b"]
    log.write_text("c\n")
    assert tail.read_lines() == ["c"]
    with open(tmp_path / "access.log.1", "a") as handle:
        handle.write("late\n")
    with open(log, "a") as handle:
        handle.write("d\n")
    assert tail.read_lines() == ["d"]


def test_tailer_handles_copytruncate_and_a_late_file(ex, tmp_path):
    log = tmp_path / "access.log"
    tail = ex.LogTailer(str(log))
    assert tail.read_lines() == []
    log.write_text("x\ny\n")
    assert tail.read_lines() == ["x", "y"]
    with open(log, "w") as handle:
        handle.write("z\n")
    assert tail.read_lines() == ["z"]


# ------------------------------------------------------------------ collection and exposition


def _config(tmp_path, log, servers=True):
    servers_file = tmp_path / "servers.json"
    if servers:
        servers_file.write_text(
            json.dumps(
                {
                    "servers": [
                        {"host": "gpu1", "id": 0, "endpoint": "127.0.0.1:18951", "num_parallel": 2, "max_conns": 4},
                        {"host": "gpu1", "id": 1, "endpoint": "127.0.0.1:18959", "num_parallel": 2, "max_conns": 4},
                    ]
                }
            )
        )
    return {
        "host": "gpu1",
        "instances": [
            {
                "id": 0,
                "port": 18951,
                "bind_address": "0.0.0.0",
                "local_url": "http://127.0.0.1:18951",
                "gpu_uuids": [GPU0],
                "num_parallel": 2,
                "max_queue": 16,
            },
            {
                "id": 1,
                "port": 18959,
                "bind_address": "127.0.0.1",
                "local_url": "http://127.0.0.1:18959",
                "gpu_uuids": [GPU1],
                "num_parallel": 2,
                "max_queue": 16,
            },
        ],
        "nvidia_smi": "/usr/bin/nvidia-smi",
        "gateway": {
            "access_log": str(log),
            "status_url": "http://127.0.0.1:80/herd/nginx_status",
            "pools_url": "http://127.0.0.1:80/herd/pools",
            "servers_file": str(servers_file),
        },
        "buckets": [0.01, 0.1, 1],
    }


def _fake_fetch(url, _timeout):
    if url.endswith("/herd/pools"):
        return fixture_text("herd_pools.json")
    if url.endswith("/herd/nginx_status"):
        return (
            "Active connections: 9 \nserver accepts handled requests\n 20 20 40 \nReading: 1 Writing: 7 Waiting: 1 \n"
        )
    if url == "http://127.0.0.1:18951/api/ps":
        return fixture_text("api_ps.json")
    raise urllib.error.URLError("connection refused")


def _exporter(ex, tmp_path, fetch=_fake_fetch, **kw):
    log = tmp_path / "access.log"
    log.write_text("")
    exporter = ex.Exporter(
        _config(tmp_path, log, **kw), fetch=fetch, smi=lambda *_: fixture_text("nvidia-smi-query.csv")
    )
    with open(log, "a") as handle:
        handle.write(fixture_text("gateway-access.log") + "garbage line\n")
    return exporter


def test_scrape_is_valid_exposition_with_the_right_numbers(ex, tmp_path):
    text = ex.render(_exporter(ex, tmp_path).collect())
    fams = promcheck.parse(text)
    v = promcheck.sample_value
    # Instances: 0 answers /api/ps with two models, 1 is down.
    assert v(fams, "herd_instance_up", instance_id="0", port="18951", gpu_uuid=GPU0) == 1
    assert v(fams, "herd_instance_up", instance_id="1") == 0
    assert v(fams, "herd_instance_models_loaded", instance_id="0") == 2
    assert v(fams, "herd_instance_model_vram_bytes", instance_id="0", model="qwen2.5:7b") == 4831838208
    assert v(fams, "herd_exporter_collector_success", collector="instances") == 0
    # GPUs, owned by the plan's instances.
    assert v(fams, "herd_gpu_utilization_percent", gpu="0", gpu_uuid=GPU0, instance_id="0") == 87
    assert v(fams, "herd_gpu_memory_used_bytes", gpu_uuid=GPU1, instance_id="1") == 1024 * 1024
    assert 'gpu="2"' not in text.split("herd_gpu_utilization_percent")[-1].split("# HELP")[0]  # [N/A] left out
    # Gateway log: 5 answers from 18951 (one after a retry), 3 "no live upstream", one 403.
    assert v(fams, "herd_gateway_requests_total", upstream="127.0.0.1:18951", status="200", instance_id="0") == 5
    assert v(fams, "herd_gateway_requests_total", upstream="none", status="502") == 3
    assert v(fams, "herd_gateway_requests_total", upstream="none", status="403") == 1
    assert v(fams, "herd_gateway_upstream_attempts_total", upstream="127.0.0.1:18959", upstream_status="502") == 1
    assert v(fams, "herd_gateway_request_duration_seconds_count", upstream="127.0.0.1:18951") == 5
    assert v(fams, "herd_gateway_request_duration_seconds_bucket", upstream="127.0.0.1:18951", le="0.01") == 0
    assert v(fams, "herd_gateway_request_duration_seconds_bucket", upstream="127.0.0.1:18951", le="0.1") == 5
    assert v(fams, "herd_gateway_upstream_header_duration_seconds_sum", upstream="127.0.0.1:18951") == pytest.approx(
        0.054 + 0.052 + 0.052 + 0.052 + 0.062
    )
    assert v(fams, "herd_gateway_log_lines_total", result="invalid") == 1
    # stub_status: 1 reading + 7 writing - this scrape = 7 in flight; 4 slots -> 3 queued.
    assert v(fams, "herd_gateway_requests_in_flight") == 7
    assert v(fams, "herd_gateway_capacity_requests") == 4
    assert v(fams, "herd_gateway_requests_queued_estimate") == 3
    assert v(fams, "herd_gateway_connections_active") == 9


def test_pool_queue_metrics_from_the_gateways_pools_json(ex, tmp_path):
    text = ex.render(_exporter(ex, tmp_path).collect())
    fams = promcheck.parse(text)
    v = promcheck.sample_value
    pool = {"host": "gpu1", "pool": "qwen2.5:7b"}
    assert v(fams, "herd_gateway_pools_available") == 1
    assert v(fams, "herd_exporter_collector_success", collector="gateway_pools") == 1
    assert v(fams, "herd_gateway_pool_queue_depth", **pool) == 3
    assert v(fams, "herd_gateway_pool_queue_max", **pool) == 64
    assert v(fams, "herd_gateway_pool_admitted_total", **pool) == 120
    assert v(fams, "herd_gateway_pool_rejected_total", reason="full", **pool) == 2
    assert v(fams, "herd_gateway_pool_rejected_total", reason="timeout", **pool) == 1
    assert v(fams, "herd_gateway_pool_abandoned_total", **pool) == 4
    # the histogram keeps the gateway's cumulative buckets, with Prometheus' spelling of the bounds
    assert v(fams, "herd_gateway_pool_wait_seconds_bucket", le="0.005", **pool) == 50
    assert v(fams, "herd_gateway_pool_wait_seconds_bucket", le="1", **pool) == 115
    assert v(fams, "herd_gateway_pool_wait_seconds_bucket", le="+Inf", **pool) == 121
    assert v(fams, "herd_gateway_pool_wait_seconds_count", **pool) == 121
    assert v(fams, "herd_gateway_pool_wait_seconds_sum", **pool) == 37.5
    les = [lab["le"] for name, lab, _ in fams["herd_gateway_pool_wait_seconds"]["samples"]
           if name.endswith("_bucket") and lab["pool"] == "qwen2.5:7b"]
    assert les == ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "+Inf"]
    assert v(fams, "herd_gateway_pool_queue_depth", pool="llama3.2:1b") == 0
    assert v(fams, "herd_gateway_pool_instance_inflight", server="gpu1:0", endpoint="127.0.0.1:18951", **pool) == 2
    assert v(fams, "herd_gateway_pool_instance_down", server="gpu1:1", **pool) == 1
    assert v(fams, "herd_gateway_pool_instance_max_conns", server="gpu1:1", **pool) == 4
    # conversation affinity by result; a pool from a gateway without affinity counters publishes none
    assert v(fams, "herd_gateway_pool_affinity_total", result="hit", **pool) == 90
    assert v(fams, "herd_gateway_pool_affinity_total", result="miss", **pool) == 7
    assert v(fams, "herd_gateway_pool_affinity_total", result="new", **pool) == 23
    assert {lab["pool"] for _n, lab, _v in fams["herd_gateway_pool_affinity_total"]["samples"]} == {"qwen2.5:7b"}
    # waits for a prefix being evaluated (prefix mode only: absent from the other pool)
    assert v(fams, "herd_gateway_pool_prefix_waits_total", **pool) == 5
    assert {lab["pool"] for _n, lab, _v in fams["herd_gateway_pool_prefix_waits_total"]["samples"]} == {"qwen2.5:7b"}
    # prefix routing: the prompt bytes each request found cached, as a histogram (bounds in bytes)
    assert v(fams, "herd_gateway_pool_prefix_hit_bytes_bucket", le="0", **pool) == 30
    assert v(fams, "herd_gateway_pool_prefix_hit_bytes_bucket", le="16384", **pool) == 70
    assert v(fams, "herd_gateway_pool_prefix_hit_bytes_bucket", le="+Inf", **pool) == 120
    assert v(fams, "herd_gateway_pool_prefix_hit_bytes_sum", **pool) == 2500000
    assert v(fams, "herd_gateway_pool_prefix_hit_bytes_count", **pool) == 120
    assert {lab["pool"] for _n, lab, _v in fams["herd_gateway_pool_prefix_hit_bytes"]["samples"]} == {"qwen2.5:7b"}


def test_pools_answer_captured_from_the_gateway(ex):
    """/herd/pools as role gateway's Lua answered it (benchmark short mode, 2 instances, 48 requests)."""
    (pool,) = ex.parse_pools(fixture_text("herd_pools_captured.json"))
    assert pool["name"] == "herd-tiny:1b" and pool["admitted"] == 48 and pool["queued"] == 0
    assert pool["wait"]["count"] == 48 and pool["wait"]["buckets"][-1] == (float("inf"), 48)
    assert [i["key"] for i in pool["instances"]] == ["bench:0", "bench:1"]


def _fetch_with_pools(answer):
    def fetch(url, timeout):
        if url.endswith("/herd/pools"):
            if isinstance(answer, Exception):
                raise answer
            return answer
        return _fake_fetch(url, timeout)

    return fetch


@pytest.mark.parametrize(
    "answer, collector_ok",
    [
        (urllib.error.HTTPError("http://127.0.0.1:80/herd/pools", 404, "Not Found", {}, None), 1),  # older gateway
        (urllib.error.HTTPError("http://127.0.0.1:80/herd/pools", 500, "Error", {}, None), 0),
        (urllib.error.URLError("connection refused"), 0),
        ("<html>not json</html>", 0),
        ('{"pools": [{"name": "m", "queued": -1}]}', 0),
    ],
    ids=["404", "500", "refused", "html", "bad-pool"],
)
def test_without_pools_nothing_is_published_and_a_gauge_says_so(ex, tmp_path, answer, collector_ok):
    text = ex.render(_exporter(ex, tmp_path, fetch=_fetch_with_pools(answer)).collect())
    fams = promcheck.parse(text)
    assert promcheck.sample_value(fams, "herd_gateway_pools_available") == 0
    assert promcheck.sample_value(fams, "herd_exporter_collector_success", collector="gateway_pools") == collector_ok
    assert not [name for name in fams if name.startswith("herd_gateway_pool_")]
    # the rest of the gateway's metrics are still there
    assert promcheck.sample_value(fams, "herd_gateway_requests_in_flight") == 7


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p["wait_seconds"]["buckets"].pop("+Inf"), "no \\+Inf bucket"),
        (lambda p: p["wait_seconds"]["buckets"].update({"0.01": 1}), "not cumulative"),
        (lambda p: p["wait_seconds"].update({"count": 7}), "!= count"),
        (lambda p: p.update({"admitted": "12"}), "admitted must be a number"),
        (lambda p: p.pop("name"), "without a name"),
    ],
)
def test_pools_parser_rejects_what_it_cannot_publish_truthfully(ex, mutate, message):
    data = json.loads(fixture_text("herd_pools.json"))
    mutate(data["pools"][0])
    with pytest.raises(ValueError, match=message):
        ex.parse_pools(json.dumps(data))


def test_an_empty_pool_list_publishes_only_the_gauge(ex, tmp_path):
    fams = promcheck.parse(ex.render(_exporter(ex, tmp_path, fetch=_fetch_with_pools('{"pools": []}')).collect()))
    assert promcheck.sample_value(fams, "herd_gateway_pools_available") == 1
    assert not [name for name in fams if name.startswith("herd_gateway_pool_")]


def test_counters_only_grow_across_scrapes(ex, tmp_path):
    exporter = _exporter(ex, tmp_path)
    first = promcheck.parse(ex.render(exporter.collect()))
    with open(tmp_path / "access.log", "a") as handle:
        handle.write(fixture_text("gateway-access.log").splitlines()[0] + "\n")
    second = promcheck.parse(ex.render(exporter.collect()))
    key = {"upstream": "127.0.0.1:18951", "status": "200"}
    assert promcheck.sample_value(second, "herd_gateway_requests_total", **key) == (
        promcheck.sample_value(first, "herd_gateway_requests_total", **key) + 1
    )


def test_labels_are_escaped(ex):
    fam = ex.Family("herd_test", "gauge", "a \\ help")
    fam.add({"model": 'we"ird\\name\nx'}, 1.5)
    parsed = promcheck.parse(ex.render([fam]))
    assert parsed["herd_test"]["samples"] == [("herd_test", {"model": 'we"ird\\name\nx'}, 1.5)]


def test_without_servers_file_labels_stay_and_no_estimate(ex, tmp_path):
    fams = promcheck.parse(ex.render(_exporter(ex, tmp_path, servers=False).collect()))
    assert promcheck.sample_value(fams, "herd_gateway_requests_total", upstream="127.0.0.1:18951", instance_id="") == 5
    assert "herd_gateway_requests_queued_estimate" not in fams


def test_http_endpoint_serves_metrics(ex, tmp_path):
    server = ex.serve(_exporter(ex, tmp_path), {"listen_address": "127.0.0.1", "port": 0})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            fams = promcheck.parse(answer.read().decode())
        assert promcheck.sample_value(fams, "herd_gateway_requests_total") == 9
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_main_once_reads_a_config_with_the_managed_header(ex, tmp_path, capsys):
    config = tmp_path / "exporter.json"
    config.write_text("# Ansible managed\n#\n" + json.dumps({"host": "h", "instances": [], "nvidia_smi": ""}))
    assert ex.main(["--config", str(config), "--once"]) == 0
    fams = promcheck.parse(capsys.readouterr().out)
    assert set(fams) == {"herd_exporter_collector_success", "herd_exporter_scrape_duration_seconds"}


# ------------------------------------------------------------------ the checker itself


GOOD = '# HELP a_total x\n# TYPE a_total counter\na_total{l="v"} 1\n'


@pytest.mark.parametrize(
    "bad",
    [
        GOOD.rstrip("\n"),  # no final newline
        GOOD.replace("a_total{", "a_total {"),  # space before labels
        GOOD.replace('"v"', "v"),  # unquoted label value
        GOOD.replace('"v"', '"\\t"'),  # bad escape
        GOOD.replace(" 1\n", " one\n"),  # bad value
        GOOD.replace("a_total{", "a{").replace("a_total counter", "a counter"),  # counter without _total
        GOOD + 'a_total{l="v"} 2\n',  # repeated sample
        GOOD + '# TYPE b gauge\nb 1\na_total{l="w"} 1\n',  # family not contiguous
        GOOD.replace("counter", "countr"),  # bad type
        GOOD + "# TYPE a_total counter\n",  # second TYPE
        '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',  # not cumulative
        '# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n',  # no +Inf
        '# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 1\n',  # count != +Inf
        'x{a="1",a="2"} 1\n',  # repeated label
        "9x 1\n",  # bad name
    ],
)
def test_checker_rejects_bad_exposition(bad):
    with pytest.raises(promcheck.FormatError):
        promcheck.parse(bad)


def test_checker_accepts_good_exposition():
    text = GOOD + '# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3.5\nh_count 2\nu NaN 123\n'
    fams = promcheck.parse(text)
    assert promcheck.sample_value(fams, "h_count") == 2 and promcheck.sample_value(fams, "a_total", l="v") == 1


def test_the_gateways_shared_dicts_and_held_bodies_are_published(ex, tmp_path):
    """/herd/pools' `dicts` (capacity and free space of each lua_shared_dict) and `body_held` become gauges; a
    gateway without them publishes neither."""
    data = json.loads(fixture_text("herd_pools_captured.json"))
    data["dicts"] = [{"name": "herd_gateway", "capacity": 1048576, "free_space": 987136},
                     {"name": "herd_queue", "capacity": 1048576, "free_space": 0}]
    data["body_held"] = 4096
    fams = promcheck.parse(ex.render(_exporter(ex, tmp_path, fetch=_fetch_with_pools(json.dumps(data))).collect()))
    assert promcheck.sample_value(fams, "herd_gateway_shared_dict_capacity_bytes", dict="herd_gateway") == 1048576
    assert promcheck.sample_value(fams, "herd_gateway_shared_dict_free_bytes", dict="herd_gateway") == 987136
    assert promcheck.sample_value(fams, "herd_gateway_shared_dict_free_bytes", dict="herd_queue") == 0
    assert promcheck.sample_value(fams, "herd_gateway_body_held_bytes") == 4096
    fams = promcheck.parse(ex.render(_exporter(ex, tmp_path, fetch=_fetch_with_pools(
        fixture_text("herd_pools_captured.json"))).collect()))
    assert "herd_gateway_shared_dict_free_bytes" not in fams and "herd_gateway_body_held_bytes" not in fams
    data["dicts"] = [{"name": "herd_gateway", "capacity": -1, "free_space": 0}]
    fams = promcheck.parse(ex.render(_exporter(ex, tmp_path, fetch=_fetch_with_pools(json.dumps(data))).collect()))
    assert promcheck.sample_value(fams, "herd_exporter_collector_success", collector="gateway_pools") == 0


def _token_line(key, pool, status="200", prompt="", output="", source="", ttft="", tpot="", wait=""):
    return json.dumps({"time": "2026-12-02T00:00:00+00:00", "client": "127.0.0.1", "key": key, "method": "POST",
                       "uri": "/api/generate", "status": status, "bytes": "10", "pool": pool, "request_time": "0.5",
                       "upstream": "127.0.0.1:18951", "upstream_status": status, "upstream_connect_time": "0.000",
                       "upstream_header_time": "0.1", "upstream_response_time": "0.5", "prompt_tokens": prompt,
                       "output_tokens": output, "tokens_from": source, "ttft": ttft, "tpot": tpot,
                       "queue_wait": wait, "msec": "1764633600.000"})


def test_tokens_and_requests_per_key_and_model(ex, tmp_path):
    exporter = _exporter(ex, tmp_path)
    lines = [
        _token_line("team-a", "qwen3:8b", prompt="100", output="20", source="reported", ttft="0.200", tpot="0.0300",
                    wait="0.000"),
        _token_line("team-a", "qwen3:8b", prompt="50", output="7", source="delivered", ttft="0.100", wait="1.500"),
        _token_line("", "qwen3:8b", prompt="5", output="1", source="reported"),
        _token_line("team-a", "qwen3:8b", status="429"),
        _token_line("team-b", "*"),  # no model: not a tenant's request (version, health)
        _token_line("team-b", "", status="401"),
    ]
    with open(tmp_path / "access.log", "a") as handle:
        handle.write("\n".join(lines) + "\n")
    fams = promcheck.parse(ex.render(exporter.collect()))
    v = promcheck.sample_value
    assert v(fams, "herd_gateway_tokens_total", key="team-a", model="qwen3:8b", type="prompt") == 150
    assert v(fams, "herd_gateway_tokens_total", key="team-a", model="qwen3:8b", type="output") == 27
    assert v(fams, "herd_gateway_tokens_total", key="none", model="qwen3:8b", type="output") == 1
    assert v(fams, "herd_gateway_key_requests_total", key="team-a", model="qwen3:8b", status="200") == 2
    assert v(fams, "herd_gateway_key_requests_total", key="team-a", model="qwen3:8b", status="429") == 1
    assert v(fams, "herd_gateway_key_requests_total", key="team-b") == 0
    assert v(fams, "herd_gateway_time_to_first_token_seconds_count", model="qwen3:8b") == 2
    assert v(fams, "herd_gateway_time_to_first_token_seconds_sum", model="qwen3:8b") == pytest.approx(0.3)
    assert v(fams, "herd_gateway_time_per_output_token_seconds_bucket", model="qwen3:8b", le="0.03") == 1
    assert v(fams, "herd_gateway_time_per_output_token_seconds_count", model="qwen3:8b") == 1
    # Queue waits per key (requests the queue admitted; a 429 never waited)
    assert v(fams, "herd_gateway_key_queue_wait_seconds_count", key="team-a", model="qwen3:8b") == 2
    assert v(fams, "herd_gateway_key_queue_wait_seconds_sum", key="team-a", model="qwen3:8b") == pytest.approx(1.5)
    assert v(fams, "herd_gateway_key_queue_wait_seconds_count", key="none") == 0


def test_tenant_series_are_bounded(ex):
    stats = ex.GatewayStats([0.1, 1])
    for index in range(ex.MAX_TENANT_SERIES + 50):
        stats.add_line(_token_line(f"k{index}", "m:1", prompt="1", output="1", source="reported"))
    assert len(stats.tenants) == ex.MAX_TENANT_SERIES + 1
    assert stats.tokens[("other", "other", "prompt")] == 50
    # A count that is not a whole number of tokens is not counted.
    assert ex.parse_log_line(_token_line("a", "m:1", prompt="-3", output="1e9"))["prompt_tokens"] is None
