#!/usr/bin/python3
"""Test client of the gateway scenario: one HTTP request, or one streamed generation with chunk timestamps.

  h4-client request METHOD URL [--key KEY] [--body JSON]
  h4-client stream URL [--key KEY] [--model M] [--tokens N] [--out FILE] [--hangup SECONDS]
  h4-client batch BASE_URL SPEC_FILE [--key KEY] [--concurrency N]
  h4-client ttft URL [--key KEY] [--count N]
Prints (or writes to FILE) one JSON object; `stream` also writes FILE.upstream as soon as headers arrive.
"""

import argparse
import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse


def connect(url, timeout):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    path = parts.path + ("?" + parts.query if parts.query else "")
    return conn, path


def headers_for(key):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    return headers


def do_request(args):
    conn, path = connect(args.url, 30)
    conn.request(args.method, path, body=args.body, headers=headers_for(args.key))
    resp = conn.getresponse()
    body = resp.read().decode("utf-8", "replace")
    return {"status": resp.status, "headers": {k.lower(): v for k, v in resp.getheaders()}, "body": body}


def do_stream(args):
    body = json.dumps({"model": args.model, "prompt": "count", "stream": True, "options": {"num_predict": args.tokens}})
    start = time.monotonic()
    conn, path = connect(args.url, 120)
    conn.request("POST", path, body=body, headers=headers_for(args.key))
    if args.hangup:
        # Hang up before any answer (a client that gives up while queued).
        time.sleep(args.hangup)
        conn.sock.close()
        return {"status": 0, "hangup": args.hangup, "t_end": time.monotonic() - start}
    resp = conn.getresponse()
    result = {"status": resp.status, "upstream": resp.getheader("X-Herd-Upstream", ""),
              "t_headers": time.monotonic() - start, "chunk_times": [], "done": False, "error": None}
    if args.out:
        with open(args.out + ".upstream", "w", encoding="utf-8") as handle:
            handle.write(result["upstream"])
    if resp.status != 200:
        result["error"] = resp.read().decode("utf-8", "replace")
    else:
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.strip():
                continue
            result["chunk_times"].append(time.monotonic() - start)
            chunk = json.loads(line)
            if chunk.get("done"):
                result["done"] = True
    result["t_end"] = time.monotonic() - start
    result["chunks"] = len(result["chunk_times"])
    return result


def one_of_batch(base, key, item):
    start = time.monotonic()
    conn, path = connect(base + item["path"], 120)
    try:
        conn.request(item.get("method", "POST"), path, body=json.dumps(item["body"]) if "body" in item else None,
                     headers=headers_for(key))
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        return {"i": item.get("i"), "status": resp.status, "upstream": resp.getheader("X-Herd-Upstream", ""),
                "t_end": time.monotonic() - start, "body": body[-300:]}
    except (OSError, http.client.HTTPException) as exc:
        return {"i": item.get("i"), "status": 0, "error": repr(exc)}
    finally:
        conn.close()


def do_batch(args):
    from concurrent.futures import ThreadPoolExecutor

    with open(args.spec, encoding="utf-8") as handle:
        items = json.load(handle)
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        return list(pool.map(lambda item: one_of_batch(args.url, args.key, item), items))


def do_ttft(args):
    """Pairs: one streamed request through the gateway, then one straight to the instance that served it."""
    gateway, direct = [], []
    for _ in range(args.count):
        one = argparse.Namespace(url=args.url, key=args.key, model=args.model, tokens=1, out=None, hangup=0)
        g = do_stream(one)
        if g["status"] != 200 or not g["chunk_times"]:
            return {"error": g}
        gateway.append(g["chunk_times"][0])
        one.url = "http://" + g["upstream"] + "/api/generate"
        d = do_stream(one)
        direct.append(d["chunk_times"][0])
    return {"gateway": gateway, "direct": direct}


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    req = sub.add_parser("request")
    req.add_argument("method")
    req.add_argument("url")
    req.add_argument("--key")
    req.add_argument("--body")
    stream = sub.add_parser("stream")
    stream.add_argument("url")
    stream.add_argument("--key")
    stream.add_argument("--model", default="herd-tiny:1b")
    stream.add_argument("--tokens", type=int, default=40)
    stream.add_argument("--out")
    stream.add_argument("--hangup", type=float, default=0)
    batch = sub.add_parser("batch")
    batch.add_argument("url")
    batch.add_argument("spec")
    batch.add_argument("--key")
    batch.add_argument("--concurrency", type=int, default=8)
    ttft = sub.add_parser("ttft")
    ttft.add_argument("url")
    ttft.add_argument("--key")
    ttft.add_argument("--model", default="herd-tiny:1b")
    ttft.add_argument("--count", type=int, default=40)
    args = parser.parse_args()
    try:
        result = {"request": do_request, "stream": do_stream, "batch": do_batch, "ttft": do_ttft}[args.cmd](args)
    except (OSError, http.client.HTTPException) as exc:
        result = {"status": 0, "error": repr(exc)}
    text = json.dumps(result)
    if getattr(args, "out", None):
        with open(args.out + ".tmp", "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(args.out + ".tmp", args.out)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
