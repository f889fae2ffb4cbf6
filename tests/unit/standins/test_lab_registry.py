"""The lab registry (lab/standins/lab_registry.py) speaks the registry protocol as Ollama's client uses it.

The real client's side is proven in test_real_contract.py (the real Ollama binary pulls from it); here the
protocol itself: manifests by namespace/model/tag, HEAD for a blob's size, the redirect to another host name for a
blob download (Ollama's downloader refuses anything else), ranged reads, and the registry's 404s.
"""

import hashlib
import http.client
import json

import pytest
from standins_lab import lab_registry_module as reg

TINY = "manifests/registry.ollama.ai/library/herd-tiny/1b"


def request(port, method, path, headers=None, host="127.0.0.1"):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def registry(start_registry, lab_models):
    return start_registry(lab_models)


def test_ping_and_manifest(registry, lab_models):
    assert request(registry.port, "GET", "/v2/")[0] == 200
    status, headers, body = request(registry.port, "GET", "/v2/library/herd-tiny/manifests/1b")
    raw = (lab_models / TINY).read_bytes()
    assert status == 200 and body == raw
    assert headers["Content-Type"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_unknown_names_are_the_registrys_404(registry):
    for path in ("/v2/library/herd-tiny/manifests/9b", "/v2/library/nope/manifests/1b", "/v2/../../etc/manifests/x",
                 "/v2/library/herd-tiny/blobs/sha256:" + "0" * 64, "/blobs/sha256-" + "0" * 64, "/elsewhere"):
        status, _headers, body = request(registry.port, "GET", path)
        assert status == 404, path
        assert json.loads(body)["errors"][0]["code"] in ("MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"), path


def test_blob_head_redirect_and_ranges(registry, lab_models):
    manifest = json.loads((lab_models / TINY).read_bytes())
    digest = manifest["layers"][0]["digest"]
    data = (lab_models / "blobs" / digest.replace(":", "-")).read_bytes()
    path = f"/v2/library/herd-tiny/blobs/{digest}"
    status, headers, body = request(registry.port, "HEAD", path)
    assert status == 200 and int(headers["Content-Length"]) == len(data) and body == b""
    # GET redirects to another host name (127.0.0.1 <-> localhost): Ollama's downloader requires it.
    status, headers, _ = request(registry.port, "GET", path)
    assert status == 307 and headers["Location"] == f"http://localhost:{registry.port}/blobs/{digest}"
    status, headers, _ = request(registry.port, "GET", path, host="localhost")
    assert status == 307 and headers["Location"] == f"http://127.0.0.1:{registry.port}/blobs/{digest}"
    status, headers, body = request(registry.port, "GET", f"/blobs/{digest}")
    assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
    status, headers, body = request(registry.port, "GET", f"/blobs/{digest}", {"Range": "bytes=10-99"})
    assert status == 206 and body == data[10:100] and headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    status, headers, body = request(registry.port, "GET", f"/blobs/{digest}", {"Range": "bytes=-5"})
    assert status == 206 and body == data[-5:]
    assert request(registry.port, "GET", f"/blobs/{digest}", {"Range": f"bytes={len(data)}-"})[0] == 416


def test_blob_host_setting_and_other_hosts():
    digest = "sha256:" + "a" * 64
    assert reg.blob_location("10.0.0.5:5000", "", digest) == f"http://10.0.0.5:5000/blobs/{digest}"
    assert reg.blob_location("127.0.0.1:5000", "", digest) == f"http://localhost:5000/blobs/{digest}"
    assert reg.blob_location("mirror:5000", "cdn.local:8080", digest) == f"http://cdn.local:8080/blobs/{digest}"
    assert reg.blob_location("mirror", "", digest) == f"http://mirror/blobs/{digest}"


@pytest.mark.parametrize(("header", "size", "want"), [
    ("bytes=0-9", 100, (0, 9)), ("bytes=90-", 100, (90, 99)), ("bytes=-10", 100, (90, 99)),
    ("bytes=50-500", 100, (50, 99)), (None, 100, None)])
def test_parse_range(header, size, want):
    assert reg.parse_range(header, size) == want


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=9-3", "bytes=-", "items=0-1", "bytes=0-1,5-6"])
def test_parse_range_unsatisfiable(header):
    with pytest.raises(ValueError):
        reg.parse_range(header, 100)
