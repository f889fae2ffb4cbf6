"""Pure parsers of the Ollama emulator: OLLAMA_HOST, durations, keep-alive, CUDA_VISIBLE_DEVICES."""

import json
import math

import pytest
from standins_lab import GPUS, emulator


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("127.0.0.1", ("http", "127.0.0.1", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        (":21442", ("http", "", 21442)),  # every address, as Go's net.Listen(":21442")
        ("127.0.0.1:21442", ("http", "127.0.0.1", 21442)),
        ("http://host", ("http", "host", 80)),
        ("http://10.1.2.3/", ("http", "10.1.2.3", 80)),
        ("https://h", ("https", "h", 443)),
        ("https://h:8443/", ("https", "h", 8443)),
        ("127.0.0.1:11435/", ("http", "127.0.0.1", 11435)),
        ("[::1]:21443", ("http", "::1", 21443)),
        ("[::1]", ("http", "::1", 11434)),
        ("::1", ("http", "::1", 11434)),
        ('"10.0.0.5:11500"', ("http", "10.0.0.5", 11500)),
        ("  example.org  ", ("http", "example.org", 11434)),
        ("127.0.0.1:99999", ("http", "127.0.0.1", 11434)),  # invalid port: Ollama falls back to the default
    ],
)
def test_ollama_host_parsing(value, expected):
    assert emulator.parse_ollama_host(value) == expected


def test_listen_address_every_interface():
    settings = emulator.Settings({"OLLAMA_HOST": ":21442"})
    assert settings.host == "" and settings.port == 21442
    assert settings.listen_address == ":21442"
    assert emulator.Settings({"OLLAMA_HOST": "[::1]:5"}).listen_address == "[::1]:5"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("0", 0), ("1.5s", 1.5), ("250ms", 0.25), ("-1s", -1), ("2h", 7200)],
)
def test_go_duration(text, seconds):
    assert emulator.parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1", "10", "5 m", "m", ""])
def test_go_duration_rejects(text):
    with pytest.raises(ValueError, match="time: "):
        emulator.parse_go_duration(text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 300), ("", 300), ("10m", 600), ("30", 30), ("-1", math.inf), ("-5m", math.inf), ("0", 0),
     ("bogus", 300), ("'24h'", 86400)],
)
def test_keep_alive_env(value, seconds):
    assert emulator.parse_keep_alive_env(value) == seconds


def test_keep_alive_request():
    assert emulator.parse_keep_alive_request(None) is None
    assert emulator.parse_keep_alive_request(0) == 0
    assert emulator.parse_keep_alive_request(90) == 90
    assert emulator.parse_keep_alive_request(-1) == math.inf
    assert emulator.parse_keep_alive_request("-1m") == math.inf
    assert emulator.parse_keep_alive_request("2s") == 2
    with pytest.raises(ValueError, match="missing unit"):
        emulator.parse_keep_alive_request("-1")


def test_settings_defaults_and_env():
    settings = emulator.Settings({})
    assert (settings.num_parallel, settings.max_queue, settings.keep_alive, settings.max_loaded) == (1, 512, 300, 0)
    settings = emulator.Settings({"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_MAX_QUEUE": "7", "OLLAMA_KEEP_ALIVE": "-1",
                                  "OLLAMA_MAX_LOADED_MODELS": "2", "OLLAMA_MODELS": "/m"})
    assert (settings.num_parallel, settings.max_queue, settings.keep_alive, settings.max_loaded) == (4, 7, math.inf, 2)
    assert settings.models_dir == "/m"
    # Ollama ignores a non-positive OLLAMA_MAX_QUEUE
    assert emulator.Settings({"OLLAMA_MAX_QUEUE": "0"}).max_queue == 512


def _spec(name):
    return json.loads((GPUS / f"{name}.json").read_text())


def test_visible_gpus_by_index_and_uuid():
    spec = _spec("rtx4090x8")
    uuids = [gpu["uuid"] for gpu in spec["gpus"]]
    assert [g["index"] for g in emulator.visible_gpus(spec, None)] == list(range(8))
    assert [g["index"] for g in emulator.visible_gpus(spec, "3,1")] == [3, 1]
    assert [g["index"] for g in emulator.visible_gpus(spec, f"{uuids[5]},{uuids[6]}")] == [5, 6]
    assert emulator.visible_gpus(spec, "-1") == []
    assert emulator.visible_gpus(spec, "") == []
    # like CUDA: enumeration stops at the first entry that names no device
    assert [g["index"] for g in emulator.visible_gpus(spec, "2,GPU-00000000-0000-0000-0000-000000000000,4")] == [2]
    assert emulator.visible_gpus(None, "0") == []
    assert emulator.visible_gpus(_spec("none"), None) == []


def test_model_names():
    assert emulator.parse_model_name("herd-tiny:1b") == ("registry.ollama.ai", "library", "herd-tiny", "1b")
    assert emulator.parse_model_name("herd-tiny") == ("registry.ollama.ai", "library", "herd-tiny", "latest")
    assert emulator.parse_model_name("me/m:q4") == ("registry.ollama.ai", "me", "m", "q4")
    assert emulator.parse_model_name("reg.local:5000/ns/m:t") == ("reg.local:5000", "ns", "m", "t")
    assert emulator.parse_model_name("") is None
    assert emulator.parse_model_name("../x") is None
