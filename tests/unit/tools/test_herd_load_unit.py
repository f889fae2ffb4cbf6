"""Unit tests of tools/herd_load.py: percentiles, aggregation, parsing, target refusal, CLI bounds."""

import random
from pathlib import Path

import pytest
from herd_testing import load_module

TOOL = Path(__file__).resolve().parents[3] / "tools" / "herd_load.py"


def _load():
    return load_module("tools/herd_load.py", "herd_load")


hl = _load()


# --- percentile math -------------------------------------------------------


def test_percentile_matches_linear_interpolation():
    data = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert hl.percentile(data, 0) == 1
    assert hl.percentile(data, 100) == 10
    assert hl.percentile(data, 50) == pytest.approx(5.5)
    # numpy.percentile(range(1, 11), 95) == 9.55; 99 -> 9.91
    assert hl.percentile(data, 95) == pytest.approx(9.55)
    assert hl.percentile(data, 99) == pytest.approx(9.91)


def test_percentile_is_order_independent_and_ignores_none():
    rng = random.Random(7)
    data = [rng.random() for _ in range(101)]
    shuffled = data[:] + [None]
    rng.shuffle(shuffled)
    assert hl.percentile(shuffled, 50) == pytest.approx(sorted(data)[50])
    assert hl.percentile(shuffled, 99) == pytest.approx(sorted(data)[99])


def test_percentile_edge_cases():
    assert hl.percentile([], 50) is None
    assert hl.percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        hl.percentile([1], 101)


def test_distribution_fields():
    d = hl.distribution([0.5, None, 1.5, 1.0])
    assert d["count"] == 3
    assert d["min"] == 0.5 and d["max"] == 1.5
    assert d["mean"] == pytest.approx(1.0)
    assert d["p50"] == pytest.approx(1.0)
    empty = hl.distribution([])
    assert empty["count"] == 0 and empty["p99"] is None


# --- aggregation ------------------------------------------------------------


def _rec(i, ok=True, lat=1.0, ttft=0.1, tokens=10, upstream="127.0.0.1:1", cls="short", status=200, error=None):
    return hl.Record(index=i, cls=cls, start=0.0, status=status, ok=ok, ttft=ttft, latency=lat,
                     tokens=tokens, upstream=upstream, error=error)


def test_summarize_counts_throughput_errors_and_spread():
    records = [
        _rec(0, lat=1.0, upstream="a"),
        _rec(1, lat=2.0, upstream="a"),
        _rec(2, lat=3.0, upstream="b", cls="long", tokens=30),
        _rec(3, ok=False, status=503, error="http_503", tokens=0, upstream="b"),
        _rec(4, ok=False, status=0, error="timeout", tokens=0),
        _rec(5, ok=False, status=502, error=None, tokens=0),
    ]
    out = hl.summarize(records, wall=10.0)
    s = out["summary"]
    assert (s["requests"], s["ok"], s["errors"]) == (6, 3, 3)
    assert s["errors_by_status"] == {"http_502": 1, "http_503": 1, "timeout": 1}
    assert s["req_per_s"] == pytest.approx(0.3)
    assert s["output_tokens"] == 50
    assert s["output_tokens_per_s"] == pytest.approx(5.0)
    assert s["latency_s"]["p50"] == pytest.approx(2.0)
    # failed requests do not count in the instance spread
    assert out["by_upstream"]["a"]["requests"] == 2
    assert out["by_upstream"]["b"]["requests"] == 1
    assert out["by_upstream"]["a"]["share"] == pytest.approx(2 / 3)
    assert out["spread"]["max_over_min"] == pytest.approx(2.0)
    assert out["spread"]["cv"] == pytest.approx(1 / 3)
    assert out["by_class"]["long"]["output_tokens"] == 30
    assert out["by_class"]["short"]["requests"] == 5


def test_render_markdown_has_the_numbers():
    records = [_rec(i, lat=1.0 + i, upstream=f"127.0.0.1:{11434 + i % 2}") for i in range(4)]
    cfg = hl.Config(url="http://127.0.0.1:8080", concurrency=2, mix=hl.parse_mix("short"))
    result = hl.build_result(cfg, records, 5.0, "2026-01-01T00:00:00")
    md = hl.render_markdown(result)
    assert "| requests (ok / total) | 4 / 4 |" in md
    assert "| throughput | 0.80 req/s |" in md
    assert "| 127.0.0.1:11434 | 2 | 50.0% |" in md
    assert "api_key" not in result["config"]


# --- request bodies and answer parsing --------------------------------------


def test_build_body_per_api():
    g = hl.build_body("generate", "m", "hi", 7, True)
    assert g == {"model": "m", "prompt": "hi", "stream": True, "options": {"num_predict": 7}}
    c = hl.build_body("chat", "m", "hi", 7, False)
    assert c["messages"] == [{"role": "user", "content": "hi"}] and c["stream"] is False
    o = hl.build_body("openai", "m", "hi", 7, True)
    assert o["max_tokens"] == 7 and o["stream_options"] == {"include_usage": True}
    with pytest.raises(ValueError):
        hl.build_body("nope", "m", "hi", 1, True)


def test_parse_event_ollama_and_openai():
    ev = hl.parse_event("generate", '{"model":"m","response":"He","done":false}')
    assert (ev.text, ev.done, ev.tokens) == ("He", False, None)
    ev = hl.parse_event("generate", '{"response":"","done":true,"eval_count":12}')
    assert ev.done and ev.tokens == 12
    ev = hl.parse_event("chat", '{"message":{"role":"assistant","content":"x"},"done":false}')
    assert ev.text == "x"
    ev = hl.parse_event("openai", 'data: {"choices":[{"delta":{"content":"y"}}]}')
    assert ev.text == "y" and not ev.done
    assert hl.parse_event("openai", "data: [DONE]").done
    ev = hl.parse_event("openai", 'data: {"choices":[],"usage":{"completion_tokens":9}}')
    assert ev.tokens == 9
    whole = '{"object":"chat.completion","choices":[{"message":{"content":"abc"}}],"usage":{"completion_tokens":3}}'
    ev = hl.parse_event("openai", whole)
    assert ev.done and ev.text == "abc" and ev.tokens == 3
    assert hl.parse_event("generate", "   ") is None
    assert hl.parse_event("generate", '{"error":"model not found"}').error == "model not found"
    assert hl.parse_event("generate", "not json").error == "bad_json"


def test_parse_mix_presets_and_errors():
    mix = hl.parse_mix("mixed")
    assert [c.name for c in mix] == ["short", "long"]
    assert mix[0].weight == 4
    custom = hl.parse_mix("a:10:20,b:5:400:0.5")
    assert custom[1] == hl.MixClass("b", 5, 400, 0.5)
    for bad in ("", "a:1", "a:x:1", "a:1:1,a:2:2", "a:0:1", "a:1:1:-1"):
        with pytest.raises(ValueError):
            hl.parse_mix(bad)


def test_pick_class_follows_weights():
    rng = random.Random(3)
    mix = hl.parse_mix("a:1:1:9,b:1:1:1")
    picks = [hl.pick_class(mix, rng).name for _ in range(2000)]
    assert 0.85 < picks.count("a") / len(picks) < 0.95


def test_make_prompt_word_count_and_uniqueness():
    p = hl.make_prompt(20, 5)
    assert len(p.split()) == 20
    assert p != hl.make_prompt(20, 6)


# --- target refusal ---------------------------------------------------------


@pytest.mark.parametrize("addrs", [["127.0.0.1"], ["::1"], ["10.1.2.3"], ["172.20.0.5"], ["192.168.1.9"],
                                   ["fd00::1"], ["127.0.0.1", "::1"]])
def test_target_allowed_for_loopback_and_private(addrs):
    ok, _ = hl.target_allowed("h", addrs, allow_remote=False)
    assert ok


@pytest.mark.parametrize("addrs", [["8.8.8.8"], ["172.32.0.1"], ["100.64.0.1"], ["2001:db8::1"],
                                   ["10.0.0.1", "93.184.216.34"], []])
def test_target_refused_outside_lab_networks(addrs):
    ok, why = hl.target_allowed("h", addrs, allow_remote=False)
    assert not ok
    assert "allow-remote" in why or "does not resolve" in why


def test_allow_remote_overrides_refusal():
    assert hl.target_allowed("h", ["8.8.8.8"], allow_remote=True)[0]


def test_run_refuses_public_target_before_sending():
    cfg = hl.Config(url="http://example.test:80", concurrency=1, requests=1, mix=hl.parse_mix("short"))
    with pytest.raises(PermissionError):
        hl.run(cfg, resolver=lambda host, port: ["93.184.216.34"])


def test_cli_refusal_exit_code(capsys):
    assert hl.main(["--url", "http://8.8.8.8:9", "--requests", "1", "--quiet"]) == 2
    assert "refused" in capsys.readouterr().err


def test_cli_bounds_are_enforced():
    with pytest.raises(SystemExit):
        hl.parse_args(["--url", "http://127.0.0.1", "--requests", str(hl.MAX_REQUESTS + 1)])
    with pytest.raises(SystemExit):
        hl.parse_args(["--url", "http://127.0.0.1", "--duration", "0"])
    with pytest.raises(SystemExit):
        hl.parse_args(["--url", "http://127.0.0.1", "--concurrency", "2", "--rate", "1"])
    cfg, _ = hl.parse_args(["--url", "http://127.0.0.1", "--no-stream", "--prompt-mix", "mixed"])
    assert cfg.concurrency == 1 and cfg.stream is False and len(cfg.mix) == 2
