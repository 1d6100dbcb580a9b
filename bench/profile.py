"""Where ferrite-server's CPU time goes under load: `make bench-profile`.

    python bench/profile.py [--model mlp] [--concurrency 64] [--seconds 10]

Starts the release ferrite-server on the benchmark's model (settings as in
`make bench`), drives it with `ferrite-loadgen`, and samples the server with
`perf record` (cpu-clock, DWARF call graphs) while the load runs. Writes, in
.cache/bench/profile/:
  report-<model>-c<N>.txt   self time by library and by function (`perf report`)
  <model>-c<N>.svg          a flame graph (inferno, installed into .cache/tools)
and prints the top of both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

OUT = bench.CACHE / "profile"
INFERNO_VERSION = "0.12.3"
TOOLS = bench.ROOT / ".cache" / "tools"

def inferno() -> Path | None:
    collapse = TOOLS / "bin" / "inferno-collapse-perf"
    if not collapse.exists():
        print(f"==> installing inferno {INFERNO_VERSION} into {TOOLS} (flame graphs)", flush=True)
        r = subprocess.run(["cargo", "install", "--locked", f"inferno@{INFERNO_VERSION}", "--root", str(TOOLS)])
        if r.returncode != 0:
            print("!! inferno did not install: no flame graph, the text report only", flush=True)
            return None
    return TOOLS / "bin"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--server", type=Path, default=bench.SERVER)
    args = p.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf is not installed (Debian: linux-perf)")

    OUT.mkdir(parents=True, exist_ok=True)
    name = f"{args.model}-c{args.concurrency}"
    paths = {args.model: bench.build_models()[args.model]}
    repo = OUT / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    bench.ferrite_repository(repo, paths, threads=2)
    grpc, http = bench.free_port(), bench.free_port()
    server = bench.Server(
        "ferrite-server",
        [str(args.server), "serve", "--host", "127.0.0.1", "--model-repository", str(repo),
         "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(bench.free_port())],
        os.environ | {"ORT_DYLIB_PATH": str(bench.ORT_LIB), "RUST_LOG": "warn"},
        OUT / "server.log",
    )
    data = OUT / f"{name}.perf.data"
    try:
        server.wait_ready(http, list(paths), timeout=120)
        warmup = 2.0
        load = subprocess.Popen(
            [str(bench.LOADGEN), "--url", f"http://127.0.0.1:{grpc}", "--model", args.model,
             "--concurrency", str(args.concurrency), "--warmup", str(warmup), "--duration", str(args.seconds + 1)],
            stdout=subprocess.PIPE, text=True)
        time.sleep(warmup + 0.5)
        print(f"==> perf record on ferrite-server (pid {server.process.pid}) for {args.seconds:.0f} s "
              f"under {args.model} c={args.concurrency}", flush=True)
        subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf,16384",
                        "-p", str(server.process.pid), "-o", str(data), "--", "sleep", str(args.seconds)],
                       check=True)
        result = json.loads(load.communicate()[0].splitlines()[-1])
    finally:
        server.stop()
    print(f"==> load: {result['throughput_rps']:.0f} req/s, p50 {result['p50_us']} µs", flush=True)

    def perf_report(sort: str, limit: str) -> str:
        return subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio",
                               "-g", "none", "--percent-limit", limit], capture_output=True, text=True,
                              check=True).stdout

    by_library = perf_report("dso", "0.5")
    by_symbol = perf_report("dso,symbol", "0.3")
    (OUT / f"report-{name}.txt").write_text(by_library + "\n" + by_symbol)
    def top(text: str, n: int) -> str:
        lines = [" ".join(line.split())[:150] for line in text.splitlines() if line.strip() and line[0] != "#"]
        return "\n".join("    " + line for line in lines[:n])

    print(f"==> self time by library:\n{top(by_library, 12)}")
    print(f"==> hottest functions ({OUT / f'report-{name}.txt'}):\n{top(by_symbol, 20)}")

    tools = inferno()
    if tools:
        script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, check=True).stdout
        folded = subprocess.run([str(tools / "inferno-collapse-perf")], input=script, capture_output=True,
                                check=True).stdout
        svg = subprocess.run([str(tools / "inferno-flamegraph"), "--title", f"ferrite-server, {name}"],
                             input=folded, capture_output=True, check=True).stdout
        (OUT / f"{name}.svg").write_bytes(svg)
        print(f"==> flame graph: {OUT / f'{name}.svg'}")
    data.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
