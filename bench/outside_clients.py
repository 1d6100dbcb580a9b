"""Load generators that ferrite did not write, for `make bench`: ghz (gRPC,
built on grpc-go, the client most Kubernetes microservices use) and oha (HTTP,
built on hyper). They measure what users' own clients see; ferrite-loadgen,
our Rust client, once missed a 40 ms stall that every grpc-go caller saw.

Each cell runs the tool twice, a warm-up and the measured window, and turns
its JSON report into the same figures as ferrite-loadgen's line
(throughput_rps, p50_us, p99_us, requests, failed, first_error).

Both tools are built from pinned sources by bench/bench.mk (`make ghz oha`)
into .cache/bench/bin.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".cache" / "bench" / "bin"
GHZ = BIN / "ghz"
OHA = BIN / "oha"
PROTO_DIR = ROOT / "proto" / "proto"
CLIENTS = ["ghz", "oha"]
# What ghz reports for the calls it cuts itself at the end of its window.
WINDOW_END = ("the client connection is closing", "transport is closing")


def check_installed(clients: list[str]) -> None:
    for tool in (BIN / c for c in clients if c in CLIENTS):
        if not tool.exists():
            raise SystemExit(f"{tool} is missing: run `make {tool.name}` (bench/bench.mk)")


def write_requests(directory: Path, model: str, inputs: list, rng) -> dict[str, Path]:
    """One request body per protocol for `model` (FP32 inputs, batch 1):
    a serialized ModelInferRequest with raw contents for ghz, KServe v2 JSON
    for oha. The same values in both."""
    import numpy as np
    from tritonclient.grpc import service_pb2

    grpc_request = service_pb2.ModelInferRequest(model_name=model)
    json_inputs = []
    for name, ttype, shape in inputs:
        if ttype != "tensor(float)":
            raise SystemExit(f"outside clients send FP32 inputs only; {model}'s {name} is {ttype}")
        shape = [1 if d < 0 else d for d in shape]
        value = rng.random(shape, dtype=np.float32)
        grpc_request.inputs.add(name=name, datatype="FP32", shape=shape)
        grpc_request.raw_input_contents.append(value.tobytes())
        json_inputs.append({"name": name, "shape": shape, "datatype": "FP32", "data": value.ravel().tolist()})
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"grpc": directory / f"{model}.ModelInferRequest.bin", "http": directory / f"{model}.infer.json"}
    paths["grpc"].write_bytes(grpc_request.SerializeToString())
    paths["http"].write_text(json.dumps({"inputs": json_inputs}))
    return paths


def _run(argv: list[str], timeout: float) -> dict:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{Path(argv[0]).name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def ghz(port: int, body: Path, concurrency: int, warmup: float, seconds: float) -> dict:
    """ghz at its defaults (one connection, as a grpc-go ClientConn),
    closed loop of `concurrency` workers, ModelInfer with the body in
    `body` (binary protobuf)."""
    base = [str(GHZ), "--insecure", "--proto", str(PROTO_DIR / "inference.proto"), "--import-paths", str(PROTO_DIR),
            "--call", "inference.GRPCInferenceService.ModelInfer", "--binary-file", str(body),
            "-c", str(concurrency), "-O", "json"]
    target = f"127.0.0.1:{port}"
    _run(base + ["-z", f"{warmup}s", target], timeout=warmup + 120)
    report = _run(base + ["-z", f"{seconds}s", target], timeout=seconds + 120)
    codes = report.get("statusCodeDistribution") or {}
    ok = int(codes.get("OK", 0))
    # Calls still running when the window closes are cut by ghz itself as it
    # closes its connection (CANCELED "the client connection is closing",
    # UNAVAILABLE "transport is closing"): reported as cut, not as the
    # server's failures. (About one per worker; a worker may start one more
    # call as the window ends.)
    errors = report.get("errorDistribution") or {}
    cut = sum(n for text, n in errors.items() if any(s in text for s in WINDOW_END))
    failed = sum(int(n) for n in codes.values()) - ok - cut
    errors = {text: n for text, n in errors.items() if not any(s in text for s in WINDOW_END)}
    latency = {int(p["percentage"]): p["latency"] / 1000 for p in report.get("latencyDistribution") or []}
    return {
        "requests": ok, "failed": failed, "first_error": next(iter(errors), None) if failed else None,
        "cut_at_window_end": cut, "throughput_rps": ok / seconds, "seconds": seconds,
        "p50_us": latency.get(50, 0.0), "p90_us": latency.get(90, 0.0), "p99_us": latency.get(99, 0.0),
        "mean_us": report.get("average", 0) / 1000,
    }


def oha(port: int, model: str, body: Path, concurrency: int, warmup: float, seconds: float) -> dict:
    """oha at its defaults (HTTP/1.1, one kept-alive connection per worker),
    closed loop of `concurrency` workers, POST /v2/models/<model>/infer."""
    base = [str(OHA), "--no-tui", "--output-format", "json", "-m", "POST", "-T", "application/json",
            "-D", str(body), "-c", str(concurrency)]
    url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
    _run(base + ["-z", f"{warmup}s", url], timeout=warmup + 120)
    report = _run(base + ["-z", f"{seconds}s", url], timeout=seconds + 120)
    codes = {int(k): int(v) for k, v in (report.get("statusCodeDistribution") or {}).items()}
    ok = codes.get(200, 0)
    # Requests still running at the deadline are aborted by oha itself.
    errors = {k: v for k, v in (report.get("errorDistribution") or {}).items() if "deadline" not in k.lower()}
    failed = sum(n for code, n in codes.items() if code != 200) + sum(errors.values())
    percentiles = report.get("latencyPercentiles") or {}
    first = next((f"HTTP {code}" for code in codes if code != 200), next(iter(errors), None))
    return {
        "requests": ok, "failed": failed, "first_error": first if failed else None,
        "throughput_rps": ok / seconds, "seconds": seconds,
        "p50_us": (percentiles.get("p50") or 0) * 1e6, "p90_us": (percentiles.get("p90") or 0) * 1e6,
        "p99_us": (percentiles.get("p99") or 0) * 1e6,
        "mean_us": ((report.get("summary") or {}).get("average") or 0) * 1e6,
    }
