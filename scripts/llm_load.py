#!/usr/bin/env python3
"""Streams chat completions at fixed concurrency against an OpenAI-compatible server
(ferrite-server or llama-server) and reports time to first token and tokens/s.

  python scripts/llm_load.py --url http://127.0.0.1:8000 --model smol --concurrency 1 16

Each stream asks for exactly --max-tokens tokens (`ignore_eos`: start ferrite-server with
--llm-allow-ignore-eos), with a prompt of about 40 tokens; every worker sends --requests streams one after another. Standard library
only, so it runs in any Python.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlparse

SYSTEM = "You are a concise assistant."
PROMPT = "Explain why the sky looks blue during the day and red at sunset, in simple words."


def one_stream(url, model, max_tokens, prompt):
    """Returns (ttft_s, total_s, completion_tokens, prompt_tokens)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft = None
    tokens = None
    prompt_tokens = 0
    pieces = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
            prompt_tokens = chunk["usage"]["prompt_tokens"]
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                pieces += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    conn.close()
    return ttft or total, total, tokens if tokens is not None else pieces, prompt_tokens


def run(url, model, concurrency, requests, max_tokens):
    results = []
    lock = threading.Lock()

    def worker(i):
        for r in range(requests):
            # Distinct prompts so no server can share work between streams.
            out = one_stream(url, model, max_tokens, f"[{i}.{r}] {PROMPT}")
            with lock:
                results.append(out)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    ttfts = sorted(r[0] for r in results)
    per_stream = [r[2] / (r[1] - r[0]) for r in results if r[1] > r[0] and r[2] > 1]
    return {
        "concurrency": concurrency,
        "streams": len(results),
        "prompt_tokens": statistics.median(r[3] for r in results),
        "tokens": tokens,
        "aggregate_tok_s": tokens / wall,
        "per_stream_tok_s": statistics.median(per_stream) if per_stream else 0.0,
        "ttft_median_ms": 1000 * statistics.median(ttfts),
        "ttft_p90_ms": 1000 * ttfts[int(0.9 * (len(ttfts) - 1))],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="smol")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--requests", type=int, default=2, help="streams per worker")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    for _ in range(args.warmup):
        one_stream(args.url, args.model, 8, PROMPT)
    for c in args.concurrency:
        print(json.dumps(run(args.url, args.model, c, args.requests, args.max_tokens)), flush=True)


if __name__ == "__main__":
    main()
