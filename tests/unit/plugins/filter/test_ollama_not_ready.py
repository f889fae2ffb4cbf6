"""Warmup's readiness rule (filter ollama_not_ready, roles/ollama/tasks/warmup.yml) on registered loop results."""

import pytest

GPU = {"id": 0, "name": "ollama@0", "unit": "ollama@0.service", "container": None, "gpus": [0], "keep_resident": True,
       "models": ["tiny", "small:7b"]}
TURNS = dict(GPU, id=1, name="ollama@1", unit="ollama@1.service", keep_resident=False)
CPU = dict(GPU, id=2, name="ollama@2", unit="ollama@2.service", gpus=[])


def ps(inst, *models, partial=False):
    return {"item": inst, "json": {"models": [{"name": m, "size": 10, "size_vram": 5 if partial else 10} for m in models]}}


def warm(inst, model, failed=False, answer=True):
    result = {"item": [inst, model], "json": {"response": "hi"} if answer else {}}
    if failed:
        result["failed"] = True
    return result


@pytest.fixture
def not_ready(planner):
    return planner.FilterModule().filters()["ollama_not_ready"]


def test_every_model_resident_is_ready(not_ready):
    assert not_ready([ps(GPU, "tiny:latest", "small:7b")], [warm(GPU, "tiny"), warm(GPU, "small:7b")]) == []


def test_a_model_missing_from_ps_is_named_in_short_form(not_ready):
    (bad,) = not_ready([ps(GPU, "tiny:latest")], [warm(GPU, "tiny"), warm(GPU, "small:7b")])
    assert (bad["id"], bad["unit"], bad["missing"], bad["loaded"], bad["partial"]) == (
        0, "ollama@0.service", ["small:7b"], ["tiny:latest"], False)


def test_a_failed_load_is_named(not_ready):
    (bad,) = not_ready([ps(GPU, "tiny:latest", "small:7b")], [warm(GPU, "tiny"), warm(GPU, "small:7b", failed=True)])
    assert bad["failed"] == ["small:7b"] and bad["missing"] == []


def test_partly_in_gpu_memory_counts_on_gpu_instances_only(not_ready):
    (bad,) = not_ready([ps(GPU, "tiny:latest", "small:7b", partial=True),
                        ps(CPU, "tiny:latest", "small:7b", partial=True)], [])
    assert bad["id"] == 0 and bad["partial"] is True


def test_models_taking_turns_must_answer_not_stay_resident(not_ready):
    assert not_ready([ps(TURNS)], [warm(TURNS, "tiny"), warm(TURNS, "small:7b")]) == []
    (bad,) = not_ready([ps(TURNS)], [warm(TURNS, "tiny"), warm(TURNS, "small:7b", answer=False)])
    assert (bad["silent"], bad["missing"], bad["failed"]) == (["small:7b"], [], [])


def test_results_of_other_instances_do_not_count(not_ready):
    other = dict(GPU, id=5)
    assert not_ready([ps(GPU, "tiny", "small:7b")], [warm(other, "tiny", failed=True)]) == []


def test_the_warmup_uses_the_filter():
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[4] / "roles/ollama/tasks/warmup.yml").read_text(encoding="utf-8")
    assert "herd.herd.ollama_not_ready(" in text and "{%-" not in text


def test_an_embedding_model_that_embedded_answered(not_ready):
    """Warmup embeds with an embedding-only model: its answer has embeddings, no response."""
    embedded = {"item": [TURNS, "small:7b"], "json": {"embeddings": [[0.1, 0.2]]}}
    assert not_ready([ps(TURNS)], [warm(TURNS, "tiny"), embedded]) == []
    (bad,) = not_ready([ps(TURNS)], [warm(TURNS, "tiny"), dict(embedded, json={})])
    assert bad["silent"] == ["small:7b"]


def test_embedding_only_models_from_show(planner):
    embedding_only = planner.FilterModule().filters()["ollama_embedding_only"]
    results = [
        {"item": "herd-embed:v1", "status": 200, "json": {"capabilities": ["embedding"]}},
        {"item": "tiny", "status": 200, "json": {"capabilities": ["completion", "tools"]}},
        {"item": "both", "status": 200, "json": {"capabilities": ["completion", "embedding"]}},
        {"item": "old", "status": 200, "json": {"modelfile": "FROM x"}},  # a release without capabilities
        {"item": "gone", "status": 404, "json": {"error": "not found"}},
        {"item": "skipped", "skipped": True},
    ]
    assert embedding_only(results) == ["herd-embed:v1"]
    assert embedding_only(None) == []
