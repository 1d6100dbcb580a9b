#!/usr/bin/env python3
"""How much a long prompt slows the streams already running (issue 13, item 2).

Starts ferrite-server on an LLM (int4 by default) with --llm-allow-ignore-eos, opens
`streams` streaming chat completions (short prompts, `max_tokens` each, `ignore_eos`),
waits until each has produced `warmup` tokens, then sends one completion whose prompt
is `long_tokens` token ids. Every streamed chunk of the short streams is timestamped;
the inter-token latencies (ITL) are split into windows:

- steady: both ends before the long prompt was sent;
- prefill: ending between the long prompt's arrival and its first token;
- joined: ending after its first token, while it still generates;
- disturbed: prefill and joined together (what the issue's bar is about).

The bar: p99 ITL of the disturbed window within 2x the steady p99.

  .venv/bin/python bench/llm_prefill_interference.py [--binary target/release/ferrite-server]

Not a timed test: `main` prints a JSON report, `measure` returns it for other scripts
(bench helpers) to call. Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct-int4"
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary: Path, model: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    """Starts ferrite-server and waits until the model is ready; returns it and its HTTP port."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRITE_")}
    env.setdefault("ORT_DYLIB_PATH", str(REPO / ".cache" / "onnxruntime" / "libonnxruntime.so"))
    cmd = [str(binary), "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--model", f"smol={model}", "--llm-allow-ignore-eos", *extra]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ferrite-server exited; see {log}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=2)
            conn.request("GET", "/v2/models/smol/ready")
            if conn.getresponse().status == 200:
                return proc, http_port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("ferrite-server did not become ready")


def stream(port: int, path: str, body: dict, stamps: list[float], started: list[float] | None = None) -> None:
    """Sends one streaming request; appends the arrival time of every chunk with text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    if started is not None:
        started.append(time.perf_counter())
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                stamps.append(time.perf_counter())
    conn.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def summary(values: list[float]) -> dict:
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"n": len(values), "p50_ms": ms(percentile(values, 50)), "p99_ms": ms(percentile(values, 99)),
            "max_ms": ms(max(values) if values else None)}


def measure(port: int, streams: int = 8, max_tokens: int = 256, long_tokens: int = 1500,
            long_max_tokens: int = 32, warmup: int = 48) -> dict:
    """Runs the scenario against a ready server on `port` (model `smol`); returns the report."""
    stamps: list[list[float]] = [[] for _ in range(streams)]
    threads = []
    for i in range(streams):
        body = {"model": "smol", "messages": [{"role": "user", "content": f"[{i}] {PROMPT}"}],
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        t = threading.Thread(target=stream, args=(port, "/v1/chat/completions", body, stamps[i]))
        t.start()
        threads.append(t)
    while min(len(s) for s in stamps) < warmup:
        if not any(t.is_alive() for t in threads):
            raise RuntimeError("the streams ended before the warm-up")
        time.sleep(0.01)
    # Distinct ordinary token ids: no server-side cache can shorten this prefill.
    long_prompt = [100 + (i * 7919) % 40000 for i in range(long_tokens)]
    long_body = {"model": "smol", "prompt": long_prompt, "max_tokens": long_max_tokens, "temperature": 0,
                 "ignore_eos": True, "stream": True}
    long_stamps: list[float] = []
    long_sent: list[float] = []
    long_thread = threading.Thread(target=stream, args=(port, "/v1/completions", long_body, long_stamps, long_sent))
    long_thread.start()
    for t in threads + [long_thread]:
        t.join()
    sent, first, last = long_sent[0], long_stamps[0], long_stamps[-1]
    windows: dict[str, list[float]] = {"steady": [], "prefill": [], "joined": [], "disturbed": []}
    for s in stamps:
        for a, b in zip(s[8:], s[9:]):  # skip the first tokens (joins of the other streams)
            gap = b - a
            if b < sent:
                windows["steady"].append(gap)
            elif b <= first:
                windows["prefill"].append(gap)
                windows["disturbed"].append(gap)
            elif b <= last:
                windows["joined"].append(gap)
                windows["disturbed"].append(gap)
    report = {name: summary(v) for name, v in windows.items()}
    report["long_ttft_s"] = round(first - sent, 3)
    report["long_total_s"] = round(last - sent, 3)
    steady, disturbed = report["steady"]["p99_ms"], report["disturbed"]["p99_ms"]
    report["disturbed_over_steady_p99"] = round(disturbed / steady, 2) if steady and disturbed else None
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", type=Path, default=REPO / "target" / "debug" / "ferrite-server")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--port", type=int, help="use a running server (model smol) instead of starting one")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--long-tokens", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--server-arg", action="append", default=[], help="extra ferrite-server flag (repeatable)")
    ap.add_argument("--log", type=Path, default=Path("/tmp/llm_prefill_interference.log"))
    args = ap.parse_args(argv)
    proc = None
    port = args.port
    if port is None:
        proc, port = start_server(args.binary, args.model, args.server_arg, args.log)
    try:
        reports = [measure(port, args.streams, args.max_tokens, args.long_tokens) for _ in range(args.rounds)]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    out = {"binary": str(args.binary), "model": str(args.model), "rounds": reports}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
