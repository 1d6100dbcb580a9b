"""A/B comparison of two ferrite-server binaries: what one change gained.

    python bench/ab.py BEFORE_BINARY AFTER_BINARY [--rounds 5] [--seconds 5]

Both servers run side by side on the same models (the tiny MLP, and `wide`:
one FP32 Add over 1 MiB rows, where the request path's copies show) with the
same settings as `make bench`; `ferrite-loadgen` alternates between them,
round after round, at concurrency 1 and 8, so that drift on the machine hits
both alike. Prints the median throughput and p50 of each, and their ratio.
Then the same for the LLM (`make models`' SmolLM2 int4, OpenAI streaming
API, bench/llm_bench.py's load): tokens/s and time to the first token at
1 and 16 streams (`--llm-streams`; empty to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

WIDE_COLUMNS = 262144  # 1 MiB of FP32 per row


def make_wide(path: Path) -> None:
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", WIDE_COLUMNS])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", WIDE_COLUMNS])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], np.ones(1, np.float32))
    graph = helper.make_graph([helper.make_node("Add", ["INPUT0", "one"], ["OUTPUT0"])], "wide", [x], [y], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--models", default="mlp,wide")
    p.add_argument("--llm-streams", default="1,16")
    p.add_argument("--llm-seconds", type=float, default=8)
    args = p.parse_args()

    models = bench.build_models()
    wide = bench.CACHE / "models" / "wide.onnx"
    if not wide.exists():
        make_wide(wide)
    bench.MAX_BATCH.setdefault("wide", 8)
    chosen = {"mlp": models["mlp"], "wide": wide}
    chosen = {m: chosen[m] for m in args.models.split(",")}
    run_dir = bench.CACHE / "ab"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    bench.ferrite_repository(run_dir / "repo", chosen, threads=2)

    servers, ports = {}, {}
    try:
        for label, binary in (("before", args.before), ("after", args.after)):
            grpc, http = bench.free_port(), bench.free_port()
            servers[label] = bench.Server(
                label,
                [str(binary), "serve", "--host", "127.0.0.1", "--model-repository", str(run_dir / "repo"),
                 "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(bench.free_port())],
                os.environ | {"ORT_DYLIB_PATH": str(bench.ORT_LIB), "RUST_LOG": "warn"},
                run_dir / f"{label}.log",
            )
            servers[label].wait_ready(http, list(chosen), timeout=120)
            ports[label] = grpc

        results: dict[tuple, list[dict]] = {}
        for r in range(args.rounds):
            for model in chosen:
                for c in map(int, args.concurrency.split(",")):
                    order = ("before", "after") if r % 2 == 0 else ("after", "before")
                    for label in order:
                        argv = [str(bench.LOADGEN), "--url", f"http://127.0.0.1:{ports[label]}", "--model", model,
                                "--concurrency", str(c), "--warmup", "1", "--duration", str(args.seconds)]
                        done = subprocess.run(argv, capture_output=True, text=True, check=True)
                        results.setdefault((model, c, label), []).append(json.loads(done.stdout.splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    print(f"\n{'model':6} {'c':>3} | {'before req/s':>12} {'p50 µs':>8} | {'after req/s':>12} {'p50 µs':>8} | "
          f"{'throughput':>10} {'p50':>8}")
    for model in chosen:
        for c in map(int, args.concurrency.split(",")):
            med = {label: (statistics.median(x["throughput_rps"] for x in results[(model, c, label)]),
                           statistics.median(x["p50_us"] for x in results[(model, c, label)]))
                   for label in ("before", "after")}
            (bt, bp), (at, ap) = med["before"], med["after"]
            print(f"{model:6} {c:>3} | {bt:12.1f} {bp:8.0f} | {at:12.1f} {ap:8.0f} | {at / bt:9.3f}x {ap / bp:7.3f}x")
    if args.llm_streams:
        llm_ab(args.before, args.after, [int(n) for n in args.llm_streams.split(",")], args.rounds, args.llm_seconds)
    return 0


def llm_ab(before: Path, after: Path, streams: list[int], rounds: int, seconds: float) -> None:
    """Both binaries serving the LLM side by side, measured alternately."""
    import asyncio

    import llm_bench

    procs, urls = {}, {}
    results: dict[tuple, list[dict]] = {}
    try:
        for label, binary in (("before", before), ("after", after)):
            port = bench.free_port()
            procs[label] = llm_bench.start_ferrite(port, 2, binary, f"ab-{label}-llm.log")
            urls[label] = f"http://127.0.0.1:{port}"
        for r in range(rounds):
            for n in streams:
                for label in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    result = asyncio.run(llm_bench.measure(urls[label], "smollm2", n, seconds, 0))
                    results.setdefault((n, label), []).append(result)
            print(f"LLM round {r + 1}/{rounds} done", flush=True)
    finally:
        for proc in procs.values():
            llm_bench.stop(proc)
    print(f"\n{'streams':>7} | {'before tok/s':>12} {'TTFT ms':>8} | {'after tok/s':>12} {'TTFT ms':>8} | "
          f"{'tokens/s':>9} {'TTFT':>7}")
    for n in streams:
        med = {label: (statistics.median(x.get("tokens_per_s") or 0 for x in results[(n, label)]),
                       statistics.median(x.get("ttft_ms_p50") or 0 for x in results[(n, label)]))
               for label in ("before", "after")}
        (bt, bf), (at, af) = med["before"], med["after"]
        print(f"{n:>7} | {bt:12.1f} {bf:8.1f} | {at:12.1f} {af:8.1f} | {at / bt:8.3f}x {af / bf:6.3f}x")


if __name__ == "__main__":
    sys.exit(main())
