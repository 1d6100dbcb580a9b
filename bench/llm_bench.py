#!/usr/bin/env python3
"""`make bench-llm`: micro-LLM serving speed, ferrite-server against llama.cpp's
llama-server on the same GGUF model, in one run.

An OpenAI-API streaming load generator (asyncio + aiohttp): N concurrent closed-loop
streams (N = 1, 4, 16), each sending `POST /v1/chat/completions` with `stream: true`
(server-sent events), a ~40-token prompt and 64 generated tokens (greedy, no early
stop: `max_tokens` 64 and `ignore_eos`), measuring per request the time to first
token (first content chunk) and counting generated tokens; aggregate tokens/s = all
generated tokens / wall time of the window.

Targets (issue 6): at 16 streams ferrite >= llama-server; at 1 stream >= 0.8x; time
to first token for a 40-token prompt < 100 ms.

  python bench/llm_bench.py                       # both servers, started here
  python bench/llm_bench.py --only llama-server
  python bench/llm_bench.py --url NAME=http://127.0.0.1:8000 --model smollm2   # any OpenAI-compatible server

Servers started here bind to 127.0.0.1 only:
  llama-server  .cache/bench/llama-server (bench/llama_server.sh), -t 2 --parallel 16
  ferrite       target/release/ferrite-server serve --model smollm2=<.cache/models/...-int4> --llm-allow-ignore-eos
Writes bench/llm_results.json, docs/benchmarks-llm.md and docs/bench-llm-*.png.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
LLAMA_SERVER = CACHE / "bench" / "llama-server"
GGUF = CACHE / "models" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FERRITE = ROOT / "target" / "release" / "ferrite-server"
MODEL_DIR = Path(os.environ.get("BENCH_LLM_MODEL_DIR", CACHE / "models" / "smollm2-135m-instruct-int4"))
ORT_LIB = Path(os.environ.get("ORT_DYLIB_PATH", CACHE / "onnxruntime" / "libonnxruntime.so"))
RESULTS = ROOT / "bench" / "llm_results.json"
DOCS = ROOT / "docs"

# The system prompt of SmolLM2's template is added by the template itself; with it
# this user message makes a prompt of about 40 tokens.
PROMPT = "Explain in two sentences why the sky is blue."
MAX_TOKENS = 64


# ----------------------------------------------------------------------------- load
async def one_stream(session, url, model, stats, deadline, once=False):
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            # Every request here has the same prompt: llama-server would reuse the
            # previous request's KV cache for it and skip the prefill (TTFT ~20 ms),
            # which ferrite, without a prefix cache, cannot. Off, so both prefill.
            "cache_prompt": False}
    while once or time.perf_counter() < deadline:
        once = False
        t0 = time.perf_counter()
        ttft, chunks, usage = None, 0, None
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    stats["errors"] += 1
                    stats["last_error"] = f"HTTP {r.status}: {(await r.text())[:200]}"
                    await asyncio.sleep(0.1)
                    continue
                buf = b""
                async for raw in r.content:
                    buf += raw
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        line = line.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            continue
                        ev = json.loads(data)
                        if ev.get("usage"):
                            usage = ev["usage"]
                        for ch in ev.get("choices") or []:
                            delta = ch.get("delta") or {}
                            if delta.get("content"):
                                chunks += 1
                                if ttft is None:
                                    ttft = time.perf_counter() - t0
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
            stats["errors"] += 1
            stats["last_error"] = repr(e)[:200]
            continue
        end = time.perf_counter()
        tokens = (usage or {}).get("completion_tokens") or chunks
        stats["requests"].append({"start": t0, "end": end, "ttft": ttft, "tokens": tokens})


async def measure(url, model, concurrency, seconds, warmup):
    stats = {"requests": [], "errors": 0}
    timeout = aiohttp.ClientTimeout(total=300)
    # A fresh connection per request: llama-server closes idle keep-alive
    # connections under aiohttp's feet ("Can not write request body"), and both
    # servers should pay the same connection cost.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # warm-up: one request per stream
        warm = {"requests": [], "errors": 0}
        await asyncio.gather(*[one_stream(session, url, model, warm, 0.0, once=True)
                               for _ in range(concurrency)])
        t0 = time.perf_counter()
        deadline = t0 + seconds
        await asyncio.gather(*[one_stream(session, url, model, stats, deadline) for _ in range(concurrency)])
        t1 = time.perf_counter()
    reqs = stats["requests"]
    if stats.get("last_error"):
        print(f"  {stats['errors']} errors, last: {stats['last_error']}", file=sys.stderr)
    if not reqs:
        return {"concurrency": concurrency, "errors": stats["errors"], "requests": 0}
    # tokens counted for requests that finished inside the window (closed loop: the
    # window ends when the last started request finishes)
    tokens = sum(r["tokens"] for r in reqs)
    ttfts = sorted(r["ttft"] for r in reqs if r["ttft"] is not None)
    per_stream = [r["tokens"] / (r["end"] - r["start"] - (r["ttft"] or 0)) for r in reqs
                  if r["tokens"] > 1 and r["end"] - r["start"] > (r["ttft"] or 0)]
    return {
        "concurrency": concurrency,
        "requests": len(reqs),
        "errors": stats["errors"],
        "seconds": t1 - t0,
        "tokens": tokens,
        "tokens_per_s": tokens / (t1 - t0),
        "ttft_ms_p50": 1e3 * statistics.median(ttfts) if ttfts else None,
        "ttft_ms_p90": 1e3 * ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
        "decode_tokens_per_s_per_stream": statistics.median(per_stream) if per_stream else None,
        "mean_tokens_per_request": tokens / len(reqs),
    }


# ----------------------------------------------------------------------------- servers
def wait_http(url, path, seconds=180, proc=None):
    import urllib.request

    t = time.time()
    while time.time() - t < seconds:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{url}{path} not ready after {seconds}s")


def start_llama_server(port, threads):
    if not LLAMA_SERVER.exists():
        sys.exit(f"{LLAMA_SERVER} missing: run `make llama-server`")
    log = open(CACHE / "bench" / "llama-server.log", "w")
    p = subprocess.Popen([str(LLAMA_SERVER), "-m", str(GGUF), "--host", "127.0.0.1", "--port", str(port),
                          "-t", str(threads), "--parallel", "16", "-c", str(16 * 256)],
                         stdout=log, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}", "/health", proc=p)
    return p


def start_ferrite(port, threads, binary=FERRITE, log_name="ferrite-llm.log"):
    if not binary.exists():
        sys.exit(f"{binary} missing: run `make release`")
    log = open(CACHE / "bench" / log_name, "w")
    env = dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB))
    p = subprocess.Popen([str(binary), "serve", "--model", f"smollm2={MODEL_DIR}", "--host", "127.0.0.1",
                          "--http-port", str(port), "--grpc-port", str(port + 1), "--metrics-port", str(port + 2),
                          "--intra-op-threads", str(threads), "--llm-allow-ignore-eos"], stdout=log, stderr=subprocess.STDOUT, env=env)
    # Ready only once every model has loaded (/v1/models answers before that).
    wait_http(f"http://127.0.0.1:{port}", "/v2/health/ready", proc=p)
    return p


def stop(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------- report
def report(data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    DOCS.mkdir(exist_ok=True)
    servers = list(data["results"].keys())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in servers:
        rows = [r for r in data["results"][name] if r.get("requests")]
        c = [r["concurrency"] for r in rows]
        axes[0].plot(c, [r["tokens_per_s"] for r in rows], marker="o", label=name)
        axes[1].plot(c, [r["ttft_ms_p50"] for r in rows], marker="o", label=name)
    axes[0].set_title("aggregate generated tokens/s")
    axes[1].set_title("time to first token, median (ms)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].axhline(100, color="grey", ls="--", lw=0.8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {MAX_TOKENS}-token streams, {data['threads']} threads")
    fig.tight_layout()
    fig.savefig(DOCS / "bench-llm.png", dpi=110)
    plt.close(fig)

    lines = ["# Micro-LLM benchmark", "",
             f"Generated by `make bench-llm` (bench/llm_bench.py) on {data['date']}, {data['machine']}.",
             f"SmolLM2-135M-Instruct (Q4_1 GGUF; ferrite serves its ONNX conversion, {MODEL_DIR.name}), "
             f"OpenAI streaming chat completions, prompt of {data.get('prompt_tokens', '~40')} tokens, "
             f"{MAX_TOKENS} generated tokens per request (greedy), closed loop, {data['seconds']} s per cell, "
             f"{data['threads']} threads for each server. Every request prefills its whole prompt: "
             "llama-server's prompt cache is off (`cache_prompt: false`), since the requests share one prompt "
             "and ferrite has no prefix cache; with it on (its default) llama-server skips the prefill of a "
             "repeated prompt (measured once here: 22 ms to first token, 71.5 / 92.5 / 106.8 tokens/s at "
             "1 / 4 / 16 streams).", "",
             "![LLM throughput and time to first token](bench-llm.png)", "",
             "| server | streams | tokens/s (aggregate) | per-stream decode tokens/s | TTFT p50 (ms) | TTFT p90 (ms) | requests | errors |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    for name in servers:
        for r in data["results"][name]:
            lines.append(f"| {name} | {r['concurrency']} | {fmt(r.get('tokens_per_s'))} | "
                         f"{fmt(r.get('decode_tokens_per_s_per_stream'))} | {fmt(r.get('ttft_ms_p50'))} | "
                         f"{fmt(r.get('ttft_ms_p90'))} | {r.get('requests', 0)} | {r.get('errors', 0)} |")
    if "ferrite" in data["results"] and "llama-server" in data["results"]:
        f = {r["concurrency"]: r for r in data["results"]["ferrite"] if r.get("requests")}
        l = {r["concurrency"]: r for r in data["results"]["llama-server"] if r.get("requests")}  # noqa: E741
        lines += ["", "## Targets", ""]
        if 16 in f and 16 in l:
            ok = f[16]["tokens_per_s"] >= l[16]["tokens_per_s"]
            lines.append(f"- 16 streams, ferrite >= llama-server: {f[16]['tokens_per_s']:.1f} vs "
                         f"{l[16]['tokens_per_s']:.1f} tokens/s: {'met' if ok else 'NOT met'}")
        if 1 in f and 1 in l:
            ok = f[1]["tokens_per_s"] >= 0.8 * l[1]["tokens_per_s"]
            lines.append(f"- 1 stream, ferrite >= 0.8x llama-server: {f[1]['tokens_per_s']:.1f} vs "
                         f"{l[1]['tokens_per_s']:.1f} tokens/s: {'met' if ok else 'NOT met'}")
        if 1 in f and f[1].get("ttft_ms_p50") is not None:
            ok = f[1]["ttft_ms_p50"] < 100
            lines.append(f"- time to first token (1 stream) < 100 ms: {f[1]['ttft_ms_p50']:.0f} ms: "
                         f"{'met' if ok else 'NOT met'}")
    (DOCS / "benchmarks-llm.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'benchmarks-llm.md'} and {DOCS / 'bench-llm.png'}")


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["llama-server", "ferrite"], action="append",
                    help="servers to start here (default: both)")
    ap.add_argument("--url", action="append", default=[],
                    help="NAME=URL of an already running OpenAI-compatible server (instead of starting one)")
    ap.add_argument("--model", default="smollm2", help="model name sent in requests")
    ap.add_argument("--concurrency", default=os.environ.get("BENCH_LLM_CONCURRENCY", "1,4,16"))
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_LLM_SECONDS", "20")))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_LLM_THREADS", "2")))
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args()
    conc = [int(c) for c in a.concurrency.split(",")]
    targets = {}
    for u in a.url:
        name, url = u.split("=", 1)
        targets[name] = (url.rstrip("/"), None)
    if not a.url:
        for name in a.only or ["llama-server", "ferrite"]:
            targets[name] = (None, name)

    data = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": a.threads,
            "seconds": a.seconds, "max_tokens": MAX_TOKENS, "prompt": PROMPT, "results": {}}
    for name, (url, start) in targets.items():
        proc = None
        try:
            if start == "llama-server":
                proc = start_llama_server(18080, a.threads)
                url = "http://127.0.0.1:18080"
            elif start == "ferrite":
                proc = start_ferrite(18090, a.threads)
                url = "http://127.0.0.1:18090"
            rows = []
            for c in conc:
                r = asyncio.run(measure(url, a.model, c, a.seconds, 1))
                rows.append(r)
                print(f"{name:13s} streams {c:2d}: {r.get('tokens_per_s', 0):7.1f} tokens/s, "
                      f"TTFT p50 {r.get('ttft_ms_p50') or 0:6.1f} ms, per stream "
                      f"{r.get('decode_tokens_per_s_per_stream') or 0:6.1f} tokens/s, "
                      f"{r.get('requests', 0)} requests, {r.get('errors', 0)} errors", flush=True)
            data["results"][name] = rows
        except Exception as e:  # one server failing must not lose the other's numbers
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            data["results"][name] = [{"concurrency": c, "requests": 0, "errors": -1, "failure": str(e)}
                                     for c in conc]
        finally:
            stop(proc)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    if not a.no_report:
        report(data)


if __name__ == "__main__":
    main()
