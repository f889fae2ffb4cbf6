"""plugins/module_utils/ollama_names.py: names normalised as Ollama does (types/model/name.go)."""

from __future__ import annotations

import pytest
from ansible.module_utils import ollama_names as names


@pytest.mark.parametrize(
    ("given", "short", "full"),
    [
        # tagless: Ollama fills in `latest`, and /api/ps lists `tiny:latest`
        ("tiny", "tiny:latest", "registry.ollama.ai/library/tiny:latest"),
        ("herd-tiny:1b", "herd-tiny:1b", "registry.ollama.ai/library/herd-tiny:1b"),
        # the default `library/` namespace is left out of the short form
        ("library/tiny", "tiny:latest", "registry.ollama.ai/library/tiny:latest"),
        ("library/qwen2.5:7b", "qwen2.5:7b", "registry.ollama.ai/library/qwen2.5:7b"),
        # another namespace stays
        ("team/tiny", "team/tiny:latest", "registry.ollama.ai/team/tiny:latest"),
        # the default registry host is left out; another host (with a port, or a scheme) stays
        ("registry.ollama.ai/library/tiny:1b", "tiny:1b", "registry.ollama.ai/library/tiny:1b"),
        ("registry.ollama.ai/team/tiny", "team/tiny:latest", "registry.ollama.ai/team/tiny:latest"),
        ("mirror.local:5000/team/tiny", "mirror.local:5000/team/tiny:latest", "mirror.local:5000/team/tiny:latest"),
        ("https://mirror.local/library/tiny:q4", "mirror.local/library/tiny:q4", "mirror.local/library/tiny:q4"),
        ("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M", "hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M",
         "hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M"),
        ("  bge-m3  ", "bge-m3:latest", "registry.ollama.ai/library/bge-m3:latest"),
    ],
)
def test_short_and_full_names(given, short, full):
    assert names.short_name(given) == short
    assert names.full_name(names.parse_name(given)) == full
    # the short form is a fixed point: normalising twice changes nothing
    assert names.short_name(short) == short


def test_same_model_across_spellings_and_case():
    assert names.same_model("tiny", "registry.ollama.ai/library/tiny:latest")
    assert names.same_model("Library/Tiny", "tiny:latest")
    assert not names.same_model("tiny", "tiny:1b")
    assert not names.same_model("team/tiny", "tiny")


@pytest.mark.parametrize("bad", ["", "/m", "m:", "a.b/m", "bad name", "-m", "m:t!", "x" * 81, "a/b/c/d/e", 7])
def test_invalid_names_raise(bad):
    with pytest.raises(ValueError):
        names.short_name(bad)


def test_name_from_parts_round_trip():
    n = names.parse_name("mirror.local:5000/team/m:v1")
    assert names.name_from_parts(names.name_parts(n)) == "mirror.local:5000/team/m:v1"
    assert names.name_from_parts(["h", "ns", "model"]) is None


@pytest.mark.parametrize(
    ("given", "registry", "pulled"),
    [
        ("tiny", "", "registry.ollama.ai/library/tiny:latest"),
        ("tiny", "mirror.local:5000", "mirror.local:5000/library/tiny:latest"),
        ("library/qwen2.5:7b", "10.0.0.5:5000", "10.0.0.5:5000/library/qwen2.5:7b"),
        ("team/m:v1", "mirror.local", "mirror.local/team/m:v1"),
        ("Registry.Ollama.AI/library/tiny:1b", "mirror:5000", "mirror:5000/library/tiny:1b"),
        # a name with its own registry host is pulled from there, whatever the site registry
        ("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M", "mirror:5000", "hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M"),
        ("other:5001/team/m", "mirror:5000", "other:5001/team/m:latest"),
    ],
)
def test_pull_name(given, registry, pulled):
    assert names.pull_name(given, registry) == pulled


@pytest.mark.parametrize("good", ["", "mirror.local", "mirror.local:5000", "10.0.0.5:5000", "registry_1:443"])
def test_registry_ok(good):
    assert names.registry_error(good) == ""


@pytest.mark.parametrize(("bad", "says"), [
    ("http://mirror:5000", "without a scheme or a path"), ("mirror:5000/v2", "without a scheme or a path"),
    ("mirror:0", "bad port"), ("mirror:99999", "bad port"), ("mirror:port", "bad port"), (":5000", "not a valid"),
    ("-mirror", "not a valid"), ("mir ror", "not a valid"), (5000, "must be a string")])
def test_registry_errors(bad, says):
    assert says in names.registry_error(bad)
