"""Tests of `make bench-embed`'s pure parts: the texts, the figures from our
client and from hey's CSV, the order of the cells, the targets and the
report written from a results file (no peer needed; one test runs our
client against a toy batching server)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embed_bench  # noqa: E402
import embed_load  # noqa: E402
import embed_report  # noqa: E402
import embed_workload  # noqa: E402


def test_texts_are_deterministic_distinct_and_sized():
    short, long = embed_workload.texts("short"), embed_workload.texts("long")
    assert short == embed_workload.texts("short")
    assert len(set(short)) == len(short) == embed_workload.POOL
    assert {len(t.split()) for t in short} == {embed_workload.KINDS["short"]}
    assert {len(t.split()) for t in long} == {embed_workload.KINDS["long"]}


def test_bodies_carry_batch_texts_in_openai_shape():
    bodies = embed_load.bodies("m", "short", 32)
    assert len(bodies) == embed_workload.POOL // 32
    first = json.loads(bodies[0])
    assert first["model"] == "m" and len(first["input"]) == 32 and first["encoding_format"] == "float"
    assert json.loads(bodies[1])["input"][0] == embed_workload.texts("short")[32]


def test_percentile_and_summary():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert embed_load.percentile(values, 50) == 0.050
    assert embed_load.percentile(values, 99) == 0.099
    s = embed_load.summary(values, 1, "HTTP 429", 2.0, 32)
    assert s["requests"] == 100 and s["sentences_per_s"] == 1600 and s["requests_per_s"] == 50
    assert abs(s["p99_ms"] - 99) < 1e-9 and s["failed"] == 1


def test_hey_csv_rate_over_time_to_last_answer_and_failures():
    csv = ("response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset\n"
           "0.0100,0,0,0,0,0,200,0.5\n"
           "0.0200,0,0,0,0,0,429,1.0\n"
           "0.0300,0,0,0,0,0,200,1.9\n"
           "0.5000,0,0,0,0,0,200,1.5\n")  # the last answer ends at 2.0 s
    s = embed_load.parse_hey_csv(csv, 32)
    assert s["requests"] == 3 and s["failed"] == 1 and s["first_error"] == "HTTP 429"
    assert s["seconds"] == 2.0 and s["sentences_per_s"] == 48.0 and s["p99_ms"] == 500.0


def test_plan_interleaves_and_reverses():
    k = {"configs": ["ferrite", "infinity", "fastembed"], "kinds": ["short", "long"], "batch": [1, 32],
         "concurrency": [1, 8, 64], "clients": ["ours", "hey"], "hey_kinds": ["short"], "warmup": 1, "seconds": 1,
         "max_round_tokens": 32768, "limit": 45}
    cells, left_out = embed_bench.plan(k, ["ferrite", "infinity"])
    assert cells[0] == ("fastembed", "in-process", "short", 1, 1)
    at1 = [(c[0], c[1]) for c in cells if c[2:] == ("short", 1, 1) and c[0] != "fastembed"]
    at8 = [(c[0], c[1]) for c in cells if c[2:] == ("short", 1, 8)]
    assert at1 == [("ferrite", "ours"), ("ferrite", "hey"), ("infinity", "ours"), ("infinity", "hey")]
    assert at8 == [("infinity", "ours"), ("infinity", "hey"), ("ferrite", "ours"), ("ferrite", "hey")]
    # 8 x 32 x 200 tokens and more per round: left out; 64 x 32 short texts stay.
    assert left_out == [("long", 32, 8), ("long", 32, 64)]
    assert ("ferrite", "ours", "short", 32, 64) in cells
    assert not any(c[1] == "hey" and c[2] == "long" for c in cells)


def results(ferrite_c64=300.0, infinity_c64=150.0, ferrite_b32=95.0, fastembed_b32=100.0) -> dict:
    rows = []
    for cfg in ("ferrite", "infinity"):
        for batch in (1, 32):
            for c in (1, 8, 64):
                v = {64: ferrite_c64 if cfg == "ferrite" else infinity_c64}.get(c, 50.0)
                if cfg == "ferrite" and batch == 32 and c == 1:
                    v = ferrite_b32
                rows.append({"config": cfg, "client": "ours", "kind": "short", "batch": batch, "concurrency": c,
                             "requests": 10, "failed": 0, "first_error": None, "sentences_per_s": v,
                             "p50_ms": 5.0, "p99_ms": 9.0, "load_average_1min": 0.5})
    for batch in (1, 32):
        rows.append({"config": "fastembed", "client": "in-process", "kind": "short", "batch": batch,
                     "concurrency": 1, "requests": 10, "failed": 0, "first_error": None,
                     "sentences_per_s": fastembed_b32, "p50_ms": 3.0, "p99_ms": 4.0, "load_average_1min": 0.5})
    return {"started_at": "2026-12-03T07:00:00+00:00", "wall_seconds": 60.0, "threads": 2, "revision": "abc",
            "machine": {"cpu_model": "x", "usable_cpus": 2, "memory_gib": 8}, "versions": {"infinity-emb": "0.0.78"},
            "token_counts": {"short": {"mean": 12.0, "min": 12, "max": 12}},
            "knobs": {"kinds": ["short"], "batch": [1, 32], "concurrency": [1, 8, 64], "clients": ["ours"],
                      "warmup": 1, "seconds": 1, "limit": 45, "max_round_tokens": 32768,
                      "configs": ["ferrite", "infinity", "fastembed"]},
            "checks": {"ferrite": 1.0, "infinity": 0.99999}, "skipped": {}, "results": rows}


def test_targets_ratios():
    got = {what: value for what, value, _, _ in embed_report.targets(results())}
    assert got["ferrite / infinity, short texts, batch 1, concurrency 64"] == 2.0
    assert abs(got["ferrite / fastembed, short texts, batch 32, one client"] - 0.95) < 1e-9
    assert got["ferrite / fastembed, short texts, batch 32, ferrite's best concurrency"] == 3.0
    lines = "\n".join(embed_report.target_lines(results(ferrite_c64=200.0)))
    assert "1.33x** (target >= 1.5x): not met" in lines


def test_report_writes_page_plots_and_section(tmp_path, monkeypatch):
    monkeypatch.setattr(embed_report, "DOCS", tmp_path)
    (tmp_path / "benchmarks.md").write_text("# B\n\n## Embeddings\nold\n\n## Micro LLMs\nkept\n")
    embed_report.report(results())
    page = (tmp_path / "bench-embed.md").read_text()
    assert "| 32 | 64 | 300 | 5.0 ms | 9.0 ms | 150 | 5.0 ms | 9.0 ms | 2.00x |" in page
    assert "fastembed: 100" in page
    assert (tmp_path / "bench-embed.png").stat().st_size > 1000
    summary = (tmp_path / "benchmarks.md").read_text()
    assert "old" not in summary and "## Micro LLMs\nkept" in summary and "ferrite / infinity" in summary


def test_closed_loop_reads_the_rate_of_a_server_that_answers_in_bursts():
    """A server that batches every request of a round answers the whole round
    at once: with 8 clients and 0.4 s rounds its rate is 20 requests/s. A
    window that ends at a fixed time, between bursts, read about a third
    less; the window that opens and closes on an answer reads the rate."""
    from aiohttp import web

    clients, round_s = 8, 0.4
    ready = threading.Event()
    loop_box: dict = {}

    async def serve():
        release = asyncio.Event()

        async def batch_every_round():
            while True:
                await asyncio.sleep(round_s)
                release.set()
                await asyncio.sleep(0)
                release.clear()

        async def answer(request):
            await request.read()
            await release.wait()
            return web.json_response({})

        app = web.Application()
        app.router.add_post("/", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        loop_box["port"] = site._server.sockets[0].getsockname()[1]
        loop_box["ticker"] = asyncio.create_task(batch_every_round())
        ready.set()
        await asyncio.Event().wait()

    def run_server():
        loop = asyncio.new_event_loop()
        loop_box["loop"] = loop
        loop.run_until_complete(serve())

    threading.Thread(target=run_server, daemon=True).start()
    assert ready.wait(10)
    url = f"http://127.0.0.1:{loop_box['port']}/"
    t0 = time.perf_counter()
    r = asyncio.run(embed_load._closed_loop(url, [b"{}"], clients, 0.5, 1.0, 1, 20))
    assert time.perf_counter() - t0 < 10
    assert r["failed"] == 0
    assert abs(r["requests_per_s"] - clients / round_s) / (clients / round_s) < 0.1, r
