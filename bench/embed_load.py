"""The HTTP load of `make bench-embed`: our own closed-loop async client
(aiohttp) and `hey`, a load generator we did not write (Go, built from its
module by bench/bench.mk), driving the same OpenAI-shaped `/embeddings`
request against any server.

Both report the same figures: sentences/s (texts embedded per second,
requests x texts per request), requests/s, p50/p99 request latency, failures.

Standalone, against any server:

    python bench/embed_load.py --url http://127.0.0.1:8000/v1/embeddings --model all-minilm-l6-v2 \
        --kind short --batch 32 --concurrency 64 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import embed_workload

ROOT = Path(__file__).resolve().parent.parent
HEY = ROOT / ".cache" / "bench" / "bin" / "hey"


def bodies(model: str, kind: str, batch: int) -> list[bytes]:
    """OpenAI embeddings request bodies, `batch` texts each, cycling through
    the pool of `kind` texts (every request of a cell carries other texts)."""
    pool = embed_workload.texts(kind)
    return [json.dumps({"model": model, "input": [pool[(i * batch + j) % len(pool)] for j in range(batch)],
                        "encoding_format": "float"}).encode()
            for i in range(len(pool) // batch or 1)]


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    # nearest rank
    k = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summary(latencies: list[float], failed: int, first_error: str | None, seconds: float, batch: int) -> dict:
    lat = sorted(latencies)
    n = len(lat)
    return {"requests": n, "failed": failed, "first_error": first_error, "seconds": round(seconds, 3),
            "requests_per_s": n / seconds if seconds else 0.0,
            "sentences_per_s": n * batch / seconds if seconds else 0.0,
            "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "mean_ms": (sum(lat) / n * 1e3) if n else 0.0}


async def _closed_loop(url: str, payloads: list[bytes], concurrency: int, warmup: float, seconds: float,
                       batch: int, limit: float) -> dict:
    """`concurrency` workers, each sending its next request as soon as the
    last one is answered. The warm-up lasts `warmup` seconds and at least
    until every worker has had one answer (one full round of the queue, so
    the latencies measured are those of a full queue); the window then
    lasts `seconds` and at least until `concurrency` requests (3 at least)
    completed in it; either is cut at `limit` seconds. Counted: the requests that
    complete inside the window (steady state: their rate is the server's).

    The window opens and closes on a completion and counts those after its
    opening one up to its closing one: a server that batches a whole round
    answers in bursts, and a window cut at a fixed time would count a
    fraction of a burst's worth of time but none of its answers (a 4 s window
    over 2 s rounds read 16 texts/s of a server doing 30).
    Workers finish the request they are on before stopping, so no backlog is
    left on the server for the next cell."""
    import aiohttp

    counter = 0
    answered = 0  # every 200 of the cell, warm-up and drain included
    latencies: list[float] = []
    failed = 0
    first_error = None
    window = {"armed": False, "start": None, "end": None}
    warmed = set()
    stop = asyncio.Event()
    headers = {"content-type": "application/json"}

    async def worker(wid: int, session) -> None:
        nonlocal counter, failed, first_error, answered
        while not stop.is_set():
            body = payloads[counter % len(payloads)]
            counter += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    data = await r.read()
                    ok = r.status == 200
                    error = None if ok else f"HTTP {r.status}: {data[:200]!r}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                ok, error = False, f"{type(e).__name__}: {e}"
            t1 = time.perf_counter()
            answered += ok
            warmed.add(wid)
            if stop.is_set():
                continue
            if window["start"] is None:
                if window["armed"]:
                    window["start"] = t1  # the opening completion, not counted
                continue
            if ok:
                latencies.append(t1 - t0)
            else:
                failed += 1
                first_error = first_error or error
            if t1 - window["start"] >= seconds and len(latencies) + failed >= max(concurrency, 3):
                window["end"] = t1
                stop.set()

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(i, session)) for i in range(concurrency)]
        t_begin = time.perf_counter()
        while (time.perf_counter() - t_begin < warmup or len(warmed) < concurrency) and \
                time.perf_counter() - t_begin < limit:
            await asyncio.sleep(0.02)
        window["armed"] = True
        armed = time.perf_counter()
        while not stop.is_set() and time.perf_counter() - armed < limit:
            await asyncio.sleep(0.02)
        stop.set()
        end = window["end"] or time.perf_counter()  # cut at the limit: end now
        measured = end - (window["start"] or armed)
        await asyncio.wait(tasks, timeout=600)
    return summary(latencies, failed, first_error, measured, batch) | {"cell_sentences": answered * batch}


def ours(url: str, model: str, kind: str, batch: int, concurrency: int, warmup: float, seconds: float,
         limit: float = 60) -> dict:
    """Our async client on one cell."""
    return asyncio.run(_closed_loop(url, bodies(model, kind, batch), concurrency, warmup, seconds, batch, limit))


def hey(url: str, model: str, kind: str, batch: int, concurrency: int, warmup: float, seconds: float,
        body_dir: Path) -> dict:
    """hey at its defaults (HTTP/1.1, a kept-alive connection per worker),
    `concurrency` workers, one fixed body (the first request of the cell):
    a warm-up run, then the measured one (-z `seconds`), its per-request CSV
    turned into the same figures as ours."""
    if not HEY.exists():
        raise SystemExit(f"{HEY} is missing: run `make hey` (bench/bench.mk)")
    body_dir.mkdir(parents=True, exist_ok=True)
    body = body_dir / f"{kind}-{batch}.json"
    body.write_bytes(bodies(model, kind, batch)[0])
    base = [str(HEY), "-c", str(concurrency), "-m", "POST", "-T", "application/json", "-D", str(body),
            "-t", "300", "-o", "csv"]
    runs = []
    for z in (warmup, seconds):
        done = subprocess.run(base + ["-z", f"{z}s", url], capture_output=True, text=True, timeout=z + 400)
        if done.returncode != 0:
            raise SystemExit(f"hey failed ({done.returncode}):\n{done.stderr[-4000:]}")
        runs.append(parse_hey_csv(done.stdout, batch))
    return runs[1] | {"cell_sentences": (runs[0]["requests"] + runs[1]["requests"]) * batch}


def parse_hey_csv(text: str, batch: int) -> dict:
    """hey's per-request CSV (`-o csv`) as our figures. hey lets the
    requests running at the end of its -z window finish; like hey's own
    Requests/sec, the rate is every answered request over the time until the
    last one ended. Non-200 answers count as failures."""
    latencies, failed, first_error, end = [], 0, None, 0.0
    for row in csv.DictReader(io.StringIO(text)):
        end = max(end, float(row["offset"]) + float(row["response-time"]))
        if row["status-code"] == "200":
            latencies.append(float(row["response-time"]))
        else:
            failed += 1
            first_error = first_error or f"HTTP {row['status-code']}"
    # hey's CSV lists answered requests only; transport errors go to its summary.
    return summary(latencies, failed, first_error, end, batch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the embeddings URL (OpenAI shape)")
    p.add_argument("--model", required=True)
    p.add_argument("--kind", choices=list(embed_workload.KINDS), default="short")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--client", choices=["ours", "hey"], default="ours")
    a = p.parse_args()
    if a.client == "ours":
        r = ours(a.url, a.model, a.kind, a.batch, a.concurrency, a.warmup, a.seconds)
    else:
        r = hey(a.url, a.model, a.kind, a.batch, a.concurrency, a.warmup, a.seconds, ROOT / "target" / "bench-embed")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
