#!/usr/bin/env python3
"""`make bench-embed`: text embeddings, ferrite-server against infinity and
fastembed, on the same model (all-minilm-l6-v2 as `make models` builds it:
the same model.onnx and tokenizer for everyone), the same machine and the
same ONNX Runtime threads, in one interleaved run (issue 16).

Configurations:
  ferrite    ferrite-server (release build), OpenAI `POST /v1/embeddings`; its
             encoder batching at its defaults, `intra_op_threads` = the CPUs
  infinity   infinity (`infinity_emb v2`, infinity-emb from PyPI) with its
             optimum/ONNX engine on CPU, OpenAI `POST /embeddings`; its
             defaults (ONNX graph optimization, batch size 32), mean pooling
  fastembed  fastembed's TextEmbedding in process (the limit: no server, no
             HTTP), the same threads, called back to back

Cells: short (~12 tokens) and long (~200 tokens) texts x 1 and 32 texts per
request x 1, 8 and 64 concurrent closed-loop clients for the servers; 1 and
32 texts per call for fastembed. Clients: our async client (bench/embed_load.py)
on every server cell, and hey (Go, not ours) on the short-text cells, the
same request body shape for both servers. Servers and clients run in the
order ferrite, infinity, then reversed at the next concurrency.

Every embedding is checked first: each configuration's vectors against the
reference pipeline (tokenizers + onnxruntime + numpy pooling), cosine >= 0.9999.

Writes bench/embed_results.json, docs/bench-embed.md, docs/bench-embed*.png
and the "Embeddings" section of docs/benchmarks.md (bench/embed_report.py).

Each cell: a warm-up (BENCH_EMBED_WARMUP seconds and one full round of the
queue), then a window (BENCH_EMBED_SECONDS and at least one round).

Knobs (environment): BENCH_EMBED_SECONDS (4), BENCH_EMBED_WARMUP (1.5),
BENCH_EMBED_CONFIGS (ferrite,infinity,fastembed), BENCH_EMBED_KINDS (short,long),
BENCH_EMBED_BATCH (1,32), BENCH_EMBED_CONCURRENCY (1,8,64), BENCH_EMBED_CLIENTS
(ours,hey), BENCH_EMBED_HEY_KINDS (short), BENCH_EMBED_MAX_ROUND_TOKENS (32768:
server cells whose queue round carries more tokens are left out and listed),
BENCH_EMBED_CELL_LIMIT (45 s: warm-up and window each at most), BENCH_EMBED_FERRITE_REVISION
(recorded: the source the ferrite binary was built from), BENCH_EMBED_FERRITE (the binary,
target/release/ferrite-server), BENCH_EMBED_RESULTS, BENCH_EMBED_REPORT (1).

Against servers already running (nothing started for them):

    python bench/embed_bench.py --url ferrite=http://127.0.0.1:8000/v1/embeddings
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embed_load  # noqa: E402
import embed_peers as peers  # noqa: E402
import embed_workload  # noqa: E402
from bench import cpus, git_revision, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = ROOT / ".venv" / "bin" / "python"
FERRITE = Path(os.environ.get("BENCH_EMBED_FERRITE", ROOT / "target" / "release" / "ferrite-server"))
ORT_LIB = Path(os.environ.get("ORT_DYLIB_PATH", ROOT / ".cache" / "onnxruntime" / "libonnxruntime.so"))
RESULTS = Path(os.environ.get("BENCH_EMBED_RESULTS", ROOT / "bench" / "embed_results.json"))
LOGS = ROOT / "target" / "bench-embed"  # this tree's (.cache may be shared)
SERVERS = ["ferrite", "infinity"]
FASTEMBED_RUN = ROOT / "bench" / "embed" / "fastembed_run.py"


def log(message: str) -> None:
    print(f"==> {message}", flush=True)


def env_list(name: str, default: list, cast=str) -> list:
    value = os.environ.get(name)
    return [cast(v) for v in value.split(",") if v] if value else default


def knobs() -> dict:
    return {
        "seconds": float(os.environ.get("BENCH_EMBED_SECONDS", "4")),
        "warmup": float(os.environ.get("BENCH_EMBED_WARMUP", "1.5")),
        "configs": env_list("BENCH_EMBED_CONFIGS", SERVERS + ["fastembed"]),
        "kinds": env_list("BENCH_EMBED_KINDS", list(embed_workload.KINDS)),
        "batch": env_list("BENCH_EMBED_BATCH", [1, 32], int),
        "concurrency": env_list("BENCH_EMBED_CONCURRENCY", [1, 8, 64], int),
        "clients": env_list("BENCH_EMBED_CLIENTS", ["ours", "hey"]),
        "hey_kinds": env_list("BENCH_EMBED_HEY_KINDS", ["short"]),
        "max_round_tokens": int(os.environ.get("BENCH_EMBED_MAX_ROUND_TOKENS", "32768")),
        "limit": float(os.environ.get("BENCH_EMBED_CELL_LIMIT", "45")),
    }


def round_tokens(kind: str, batch: int, c: int) -> int:
    """Tokens a full round of the closed loop carries (every client's request)."""
    return c * batch * (embed_workload.KINDS[kind] + 2)


def plan(k: dict, servers: list[str]) -> tuple[list[tuple], list[tuple]]:
    """(config, client, kind, batch, concurrency) in the order run, and the
    server cells left out because one round of their queue carries more than
    `max_round_tokens` (on 2 cores, 64 clients x 32 long texts is minutes
    per round). Per cell, servers back to back, their order reversed at each
    concurrency; our client before hey on each server (hey's window is sized
    from our client's latency)."""
    cells, left_out = [], []
    for kind in k["kinds"]:
        for batch in k["batch"]:
            if "fastembed" in k["configs"]:
                cells.append(("fastembed", "in-process", kind, batch, 1))
            for i, c in enumerate(k["concurrency"]):
                if round_tokens(kind, batch, c) > k["max_round_tokens"]:
                    left_out.append((kind, batch, c))
                    continue
                clients = [cl for cl in k["clients"] if cl == "ours" or kind in k["hey_kinds"]]
                for s in (servers if i % 2 == 0 else servers[::-1]):
                    cells += [(s, cl, kind, batch, c) for cl in clients]
    return cells, left_out


def estimate(cells: list[tuple], k: dict, rate: dict | None = None) -> float:
    """Seconds the cells take: warm-up and window, and at least one round
    of the queue each at `rate` tokens/s (a guess until measured)."""
    tps = (rate or {}).get("tokens_per_s", 2000.0)
    total = 0.0
    for cfg, _, kind, batch, c in cells:
        rnd = round_tokens(kind, batch, c) / tps
        total += min(k["limit"], max(k["warmup"], rnd)) + min(k["limit"], max(k["seconds"], rnd)) + 0.5 \
            + (2 if cfg == "fastembed" else 0)
    return total


def fastembed(args: list[str], threads: int, stdin: str | None = None) -> str:
    py = peers.VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{py} is missing: run `make bench-embed-venv` (bench/bench.mk)")
    done = subprocess.run([str(py), str(FASTEMBED_RUN), *args, str(peers.peer_model_dir()), "--threads", str(threads)],
                          input=stdin, capture_output=True, text=True, env=peers.peer_env(threads), timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"fastembed failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout.strip().splitlines()[-1]


def verify(urls: dict[str, str], with_fastembed: bool, threads: int) -> dict[str, float]:
    """Each configuration's embeddings of a few short and long texts against
    the reference; returns the lowest cosine per configuration."""
    import numpy as np

    texts = embed_workload.texts("short")[:6] + embed_workload.texts("long")[:3]
    want = peers.reference(texts)
    checks = {name: peers.check(name, peers.fetch_openai(url, texts), want) for name, url in urls.items()}
    if with_fastembed:
        got = np.array(json.loads(fastembed(["embed"], threads, stdin=json.dumps(texts))), dtype=np.float32)
        checks["fastembed"] = peers.check("fastembed", got, want)
    log("checked against the reference (tokenizers + onnxruntime + numpy pooling): "
        + ", ".join(f"{n} lowest cosine {c:.7f}" for n, c in checks.items()))
    return checks


def cpu_seconds(server) -> float:
    """User + system CPU time of a server process so far (all its threads)."""
    try:
        fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def probe_ferrite(url: str) -> str | None:
    """None when `url` answers embeddings; otherwise why not (a binary
    built before the encoder endpoints answers 404)."""
    try:
        peers.fetch_openai(url, ["probe"])
        return None
    except Exception as e:  # noqa: BLE001 - any failure means not measurable; said loudly
        return f"{type(e).__name__}: {e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                   help="measure a running server (ferrite or infinity) at this OpenAI embeddings URL")
    a = p.parse_args()
    given = dict(u.split("=", 1) for u in a.url)
    k = knobs()
    threads = cpus()
    LOGS.mkdir(parents=True, exist_ok=True)
    versions = {"infinity-emb": peers.infinity_version()}
    if os.environ.get("BENCH_EMBED_FERRITE_REVISION"):  # where the measured binary was built from
        versions["ferrite-revision"] = os.environ["BENCH_EMBED_FERRITE_REVISION"]
    started = {}
    urls: dict[str, str] = {}
    skipped: dict[str, str] = {}
    started_at = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    try:
        for name in [s for s in SERVERS if s in k["configs"]]:
            if name in given:
                urls[name] = given[name]
                log(f"{name}: the running server at {given[name]}")
                continue
            log(f"starting {name} ({threads} ONNX Runtime threads)"
                + ("; infinity optimizes the graph on its first start (a minute or two, cached)"
                   if name == "infinity" else ""))
            t0 = time.monotonic()
            if name == "infinity":
                started[name], urls[name] = peers.start_infinity(peers.peer_model_dir(), threads, LOGS)
            else:
                started[name], urls[name] = peers.start_ferrite(FERRITE, ORT_LIB, threads, LOGS)
            log(f"{name} ready in {time.monotonic() - t0:.0f} s")
        if "ferrite" in urls and (why := probe_ferrite(urls["ferrite"])):
            skipped["ferrite"] = f"{urls['ferrite']} does not answer embeddings ({why[:300]})"
            log(f"NOT MEASURING ferrite: {skipped['ferrite']}")
            urls.pop("ferrite")
            if "ferrite" in started:
                started.pop("ferrite").stop()
        checks = verify(urls, "fastembed" in k["configs"], threads)
        servers = [s for s in SERVERS if s in urls]
        cells, left_out = plan(k, servers)
        for kind, batch, c in left_out:
            log(f"leaving out {kind} texts x {batch} per request x {c} clients: one round is "
                f"{round_tokens(kind, batch, c):,} tokens (BENCH_EMBED_MAX_ROUND_TOKENS {k['max_round_tokens']:,})")
        log(f"{len(cells)} cells ({', '.join(servers + [c for c in k['configs'] if c == 'fastembed'])}; "
            f"{', '.join(k['kinds'])} texts x batch {k['batch']} x concurrency {k['concurrency']}; "
            f"clients {', '.join(k['clients'])}); estimated {estimate(cells, k) / 60:.1f} min")
        results = []
        rate = {}
        t_start = time.monotonic()
        for n, (cfg, client, kind, batch, c) in enumerate(cells, 1):
            cpu_before = {name: cpu_seconds(server) for name, server in started.items()}
            t_cell = time.monotonic()
            if cfg == "fastembed":
                r = json.loads(fastembed(["measure", "--kind", kind, "--batch", str(batch), "--warmup",
                                          str(k["warmup"]), "--seconds", str(k["seconds"])], threads))
            elif client == "hey":
                ours = next((x for x in results if (x["config"], x["client"], x["kind"], x["batch"],
                                                    x["concurrency"]) == (cfg, "ours", kind, batch, c)), None)
                # Two rounds of the queue at least, as our client saw them.
                window = min(k["limit"], max(k["seconds"], 2 * (ours["p50_ms"] / 1000 if ours else 0)))
                r = embed_load.hey(urls[cfg], peers.NAME, kind, batch, c, k["warmup"], window, LOGS / "bodies")
            else:
                r = embed_load.ours(urls[cfg], peers.NAME, kind, batch, c, k["warmup"], k["seconds"], k["limit"])
            r.update(config=cfg, client=client, kind=kind, batch=batch, concurrency=c,
                     cell_seconds=round(time.monotonic() - t_cell, 2),
                     load_average_1min=round(os.getloadavg()[0], 2),
                     # CPU seconds each started server used during the cell (warm-up included):
                     # the measured one's cost, and what the idle one takes meanwhile.
                     server_cpu_seconds={name: round(cpu_seconds(server) - cpu_before[name], 2)
                                         for name, server in started.items()})
            if cfg in started and r.get("cell_sentences") and r["server_cpu_seconds"][cfg] > 0:
                # Load-insensitive: texts embedded per CPU-second the server spent in the cell.
                r["sentences_per_cpu_s"] = round(r["cell_sentences"] / r["server_cpu_seconds"][cfg], 1)
            results.append(r)
            if r["sentences_per_s"]:
                rate["tokens_per_s"] = r["sentences_per_s"] * (embed_workload.KINDS[kind] + 2)
            failed = f", {r['failed']} FAILED ({r['first_error']})" if r["failed"] else ""
            left = estimate(cells[n:], k, rate)
            print(f"[{n:2}/{len(cells)} {(time.monotonic() - t_start) / 60:4.1f} min, ~{left / 60:.1f} min left] "
                  f"{kind:5} b={batch:<2} c={c:<2} {cfg:9} {client:10} {r['sentences_per_s']:9.1f} sentences/s  "
                  f"p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms{failed}", flush=True)
    finally:
        for server in started.values():
            server.stop()
    token_counts = {kind: embed_workload.token_counts(str(peers.SERVED / "tokenizer.json"), kind)
                    for kind in k["kinds"]}
    out = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_seconds": round((dt.datetime.now(dt.timezone.utc) - started_at).total_seconds(), 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
        "revision": git_revision(),
        "threads": threads,
        "model": peers.NAME,
        "versions": versions,
        "urls_given": sorted(given),
        "token_counts": token_counts,
        "knobs": k,
        "checks": checks,
        "skipped": skipped,
        "left_out": [{"kind": kind, "batch": b, "concurrency": c, "round_tokens": round_tokens(kind, b, c)}
                     for kind, b, c in left_out],
        "results": results,
    }
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    log(f"results in {RESULTS.relative_to(ROOT) if RESULTS.is_relative_to(ROOT) else RESULTS}")
    if os.environ.get("BENCH_EMBED_REPORT", "1") == "1":
        subprocess.run([str(PY), str(ROOT / "bench" / "embed_report.py"), str(RESULTS)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
