#!/usr/bin/env python3
"""herd LAB STAND-IN: a model registry that speaks the part of Ollama's registry protocol a pull uses.

It stands in for registry.ollama.ai, or for a site's own registry or mirror, in the lab (no registry can be reached
from the lab machines). It serves a directory in Ollama's on-disk layout (what `ollama create`/`pull` write and
lab/standins/mkmodels.py makes):

    ROOT/manifests/<host>/<namespace>/<model>/<tag>    ROOT/blobs/sha256-<hex>

over the read-only half of the Docker registry v2 protocol, the way Ollama's client uses it:

    GET  /v2/                                      200 {}
    GET  /v2/<namespace>/<model>/manifests/<tag>   the manifest (any <host> folder of ROOT holding that name)
    HEAD /v2/<namespace>/<model>/blobs/<digest>    200 with Content-Length (Ollama sizes its download parts)
    GET  /v2/<namespace>/<model>/blobs/<digest>    307 to /blobs/<digest> on the blob host (see below)
    GET  /blobs/<digest>                           the bytes; `Range: bytes=a-b` answers 206 with Content-Range

Ollama's downloader (server/download.go) insists on a temporary redirect for a blob to a host with ANOTHER name
(registry.ollama.ai sends it to a CDN; 0.3.x refuses a 200). The blob host is --blob-host, or by default the
other name of the loopback address the client used (127.0.0.1 <-> localhost, same port) and the client's own
host otherwise (clients that follow any redirect, such as herd's emulator, are fine with that).

Anything else is 404 in the registry's error format ({"errors": [{"code": ...}]}), which Ollama turns into
"file does not exist". Read-only: no push, no auth. Standard library only.

Usage: lab_registry.py --root DIR [--listen 127.0.0.1:5000] [--blob-host HOST[:PORT]]
"""

import argparse
import hashlib
import http.server
import json
import os
import re
import socket
import sys

MEDIA_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
BANNER = "herd LAB STAND-IN registry (read-only, Ollama's registry protocol): not a real registry"
NAME_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
MANIFEST_PATH = re.compile(rf"^/v2/({NAME_PART})/({NAME_PART})/manifests/({NAME_PART})$")
BLOB_PATH = re.compile(rf"^/v2/({NAME_PART})/({NAME_PART})/blobs/(sha256:[0-9a-f]{{64}})$")
DIRECT_BLOB_PATH = re.compile(r"^/blobs/(sha256[:-][0-9a-f]{64})$")
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
LOOPBACK_SWAP = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}


def find_manifest(root, namespace, model, tag):
    """Path of ROOT/manifests/<host>/<namespace>/<model>/<tag> (registry.ollama.ai first, then hosts by name)."""
    base = os.path.join(root, "manifests")
    try:
        hosts = sorted(os.listdir(base), key=lambda h: (h != "registry.ollama.ai", h))
    except OSError:
        return None
    for host in hosts:
        path = os.path.join(base, host, namespace, model, tag)
        if os.path.isfile(path):
            return path
    return None


def blob_path(root, digest):
    return os.path.join(root, "blobs", digest.replace(":", "-"))


def blob_location(host_header, blob_host, digest):
    """Where a blob request is redirected: --blob-host, else the other loopback name, else the same host."""
    if blob_host:
        target = blob_host
    else:
        host, sep, port = (host_header or "127.0.0.1").rpartition(":")
        if not sep or not port.isdigit() or host.endswith(":"):
            host, port = host_header or "127.0.0.1", ""
        target = LOOPBACK_SWAP.get(host, host) + (":" + port if port else "")
    return f"http://{target}/blobs/{digest}"


def parse_range(header, size):
    """(start, end) inclusive of a single `bytes=a-b` range, None for no range, ValueError when unsatisfiable."""
    if not header:
        return None
    match = RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise ValueError(header)
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start > end or start >= size:
        raise ValueError(header)
    return start, end


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "herd-lab-registry"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status, code, message):
        body = json.dumps({"errors": [{"code": code, "message": message, "detail": self.path}]}).encode()
        self._send(status, body, [("Content-Type", "application/json; charset=utf-8")])

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self):  # noqa: N802 - http.server's naming
        root = self.server.root
        path = self.path.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            self._send(200, b"{}", [("Content-Type", "application/json; charset=utf-8"),
                                     ("Docker-Distribution-API-Version", "registry/2.0")])
            return
        match = MANIFEST_PATH.match(path)
        if match:
            manifest = find_manifest(root, *match.groups())
            if manifest is None:
                self._error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                return
            with open(manifest, "rb") as handle:
                body = handle.read()
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            self._send(200, body, [("Content-Type", MEDIA_MANIFEST), ("Docker-Content-Digest", digest)])
            return
        match = BLOB_PATH.match(path)
        if match:
            digest = match.group(3)
            if not os.path.isfile(blob_path(root, digest)):
                self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
                return
            if self.command == "HEAD":
                self._blob(digest)
                return
            location = blob_location(self.headers.get("Host"), self.server.blob_host, digest)
            self._send(307, b"", [("Location", location)])
            return
        match = DIRECT_BLOB_PATH.match(path)
        if match:
            digest = match.group(1).replace("-", ":", 1)
            if not os.path.isfile(blob_path(root, digest)):
                self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
                return
            self._blob(digest)
            return
        self._error(404, "NAME_UNKNOWN", "not found")

    def _blob(self, digest):
        path = blob_path(self.server.root, digest)
        size = os.path.getsize(path)
        try:
            wanted = parse_range(self.headers.get("Range"), size)
        except ValueError:
            self._send(416, b"", [("Content-Range", f"bytes */{size}")])
            return
        start, end = wanted if wanted else (0, size - 1)
        length = end - start + 1 if size else 0
        self.send_response(206 if wanted else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Docker-Content-Digest", digest)
        self.send_header("Content-Length", str(length))
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(path, "rb") as handle:
            handle.seek(start)
            left = length
            while left > 0:
                chunk = handle.read(min(left, 1 << 20))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


class Registry(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, root, blob_host=""):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.root = root
        self.blob_host = blob_host
        super().__init__(address, Handler)


def split_listen(listen):
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a directory in Ollama's layout (manifests/, blobs/)")
    parser.add_argument("--listen", default="127.0.0.1:5000", help="HOST:PORT (default 127.0.0.1:5000)")
    parser.add_argument("--blob-host", default="", help="HOST[:PORT] blob downloads are redirected to")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.root, "manifests")):
        parser.error(f"--root {args.root}: no manifests/ folder (build it with `make lab-artifacts`)")
    server = Registry(split_listen(args.listen), args.root, args.blob_host)
    sys.stderr.write(f"{BANNER}\nserving {args.root} on {args.listen}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
