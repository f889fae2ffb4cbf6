#!/usr/bin/env python3
"""Benchmark herd's Ollama emulator (a lab stand-in): is the emulator itself ever the bottleneck?

Starts one emulator process on a free loopback port (NUM_PARALLEL = N, busy slowdown off), then runs N
concurrent streaming /api/generate clients from an asyncio client in this process and reports, per level,
the achieved tokens/s of each stream against the configured per-slot rate. A ratio near 1.00 means the
emulator kept every stream at its simulated GPU speed. Also reports the emulator's CPU use.

    .venv/bin/python benchmarks/emulator_bench.py [--streams 8,64,256] [--rate 20] [--seconds 4]

Bounded: each level stops after --seconds plus 30 s at most. Loopback only. Standard library only.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMULATOR = REPO / "lab" / "standins" / "ollama_emulator.py"
MKMODELS = REPO / "lab" / "standins" / "mkmodels.py"
MODEL = "herd-tiny:1b"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream_once(port, num_predict):
    """One streaming generate; returns (tokens, seconds from first to last token) or raises."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": MODEL, "prompt": "benchmark", "options": {"num_predict": num_predict}}).encode()
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(status.decode().strip())
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    first = last = None
    tokens = 0
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        line = await reader.readexactly(size + 2)
        obj = json.loads(line)
        if obj.get("done"):
            break
        tokens += 1
        last = time.monotonic()
        first = first or last
    writer.close()
    return tokens, (last - first) if tokens > 1 else 0.0


async def run_level(port, streams, rate, seconds):
    num_predict = max(2, int(rate * seconds))
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(stream_once(port, num_predict) for _ in range(streams)), return_exceptions=True),
        timeout=seconds + 30)
    wall = time.monotonic() - started
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    rates = [(tokens - 1) / span for tokens, span in ok if span > 0]
    return {"streams": streams, "ok": len(ok), "errors": len(errors), "wall_s": wall,
            "tokens": sum(tokens for tokens, _ in ok), "rates": rates}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="8,64,256", help="comma-separated concurrency levels")
    parser.add_argument("--rate", type=float, default=20.0, help="configured tokens/s per slot")
    parser.add_argument("--seconds", type=float, default=4.0, help="generation time per stream")
    args = parser.parse_args()
    levels = [int(n) for n in args.streams.split(",")]

    with tempfile.TemporaryDirectory(prefix="herd-emu-bench-") as tmp:
        subprocess.run([sys.executable, str(MKMODELS), tmp, "--model", MODEL], check=True, stdout=subprocess.DEVNULL)
        print(f"emulator benchmark: one process, {MODEL}, configured {args.rate:g} tokens/s per slot, "
              f"{args.seconds:g} s per stream, NUM_PARALLEL = streams, busy slowdown off")
        print(f"{'streams':>7} {'ok':>4} {'err':>4} {'median tok/s':>12} {'min tok/s':>9} {'ratio':>6} "
              f"{'aggregate tok/s':>15} {'emulator CPU':>12}")
        worst = 1.0
        for streams in levels:
            port = free_port()
            env = dict(os.environ, OLLAMA_HOST=f"127.0.0.1:{port}", OLLAMA_MODELS=tmp, OLLAMA_NUM_PARALLEL=str(streams),
                       OLLAMA_MAX_QUEUE="4096", HERD_LAB_GPU_SPEC=str(REPO / "lab" / "gpus" / "l20x4.json"),
                       CUDA_VISIBLE_DEVICES="0", HERD_EMU_TOKENS_PER_SECOND=str(args.rate),
                       HERD_EMU_BUSY_SLOWDOWN="1", HERD_EMU_LOAD_SECONDS="0.1", HERD_EMU_ACCESS_LOG="0")
            proc = subprocess.Popen([sys.executable, str(EMULATOR), "serve"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                asyncio.run(run_level(port, 1, args.rate, 0.2))  # load the model
                cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
                res = asyncio.run(run_level(port, streams, args.rate, args.seconds))
                cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            finally:
                proc.terminate()
                proc.wait(10)
            median = statistics.median(res["rates"]) if res["rates"] else 0.0
            low = min(res["rates"]) if res["rates"] else 0.0
            worst = min(worst, median / args.rate)
            print(f"{streams:>7} {res['ok']:>4} {res['errors']:>4} {median:>12.2f} {low:>9.2f} "
                  f"{median / args.rate:>6.3f} {res['tokens'] / res['wall_s']:>15.0f} {cpu * 100:>11.0f}%")
        print(f"worst median ratio: {worst:.3f}")


if __name__ == "__main__":
    main()
