#!/usr/bin/env python3
"""`make bench`: ferrite-server against raw ONNX Runtime in process and
against Triton, on the same machine, in one run, interleaved.

Models: a tiny MLP (scripts/make_test_models.py), ResNet-50
(light_resnet50.onnx from the onnx wheel, batch dimension made dynamic) and a
BYTES-input model (the `strings` test model). Concurrency 1, 8 and 64, closed
loop, gRPC ModelInfer with raw contents, all driven by ferrite-loadgen.
Configurations, run back to back for each (model, concurrency), their order
reversed from one concurrency to the next so that drift on the machine
affects them alike:

  raw            ONNX Runtime in process (ferrite-server's runtime module), one
                 session called back to back, batch 1
  raw-batched    the same session, each call min(concurrency, max batch) rows
  ferrite        ferrite-server, dynamic batching (max batch 64, 8 for
                 ResNet-50; no added delay)
  ferrite-nobatch  ferrite-server, max_batch_size 1
  triton         tritonserver 2.51 (nvidia-pytriton wheel), Python backend
                 running onnxruntime, dynamic batcher (max batch 64, no delay)
  floor          the protocol floor (tiny MLP only): ferrite-floor (bench/floor),
                 a bare tonic/axum server on ferrite-server's transport settings
                 that answers every ModelInfer with a fixed response shaped like
                 ferrite's (no queue, no model); what is left above it is ours

Clients: ferrite-loadgen (ours) drives every cell; on the tiny MLP, ferrite
(batching), Triton and the floor are also driven by clients we did not
write, ghz over gRPC and oha over HTTP/JSON (bench/outside_clients.py), in
the same interleaved order: users see what their clients see.

Every session has the same threads: one session, N intra-op threads (N = the
CPUs this process may use), one inter-op thread.

Writes bench/results.json and regenerates docs/benchmarks.md and its plots
(bench/report.py). Knobs (environment): BENCH_SECONDS (10), BENCH_WARMUP (2),
BENCH_RESNET_SECONDS (8), BENCH_MODELS (mlp,strings,resnet50),
BENCH_CONCURRENCY (1,8,64), BENCH_CONFIGS (all), BENCH_CLIENTS
(ferrite-loadgen,ghz,oha), BENCH_RESULTS
(bench/results.json), BENCH_REPORT (1: regenerate the report).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import outside_clients
import triton_peer
from servers import FLOOR, Server, free_port, start_floor

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
PY = ROOT / ".venv" / "bin" / "python"
LOADGEN = ROOT / "target" / "release" / "ferrite-loadgen"
SERVER = ROOT / "target" / "release" / "ferrite-server"
ORT_LIB = Path(os.environ.get("ORT_DYLIB_PATH", ROOT / ".cache" / "onnxruntime" / "libonnxruntime.so"))

# Largest batch of the batching servers (and of raw ORT batched). ResNet-50
# is compute bound on a CPU (a batch of 8 costs about 8 images), and a batch
# of 64 would take longer than a measured window.
MAX_BATCH = {"mlp": 64, "strings": 64, "resnet50": 8}
MODELS = ["mlp", "strings", "resnet50"]
CONCURRENCY = [1, 8, 64]
CONFIGS = ["raw", "raw-batched", "ferrite", "ferrite-nobatch", "triton", "floor"]
LOADGEN_CLIENT = "ferrite-loadgen"
CLIENTS = [LOADGEN_CLIENT, *outside_clients.CLIENTS]
# What the outside clients measure: the servers (not raw ORT) on the model
# where the protocol is most of the cost.
OUTSIDE_MODELS = ["mlp"]
OUTSIDE_CONFIGS = ["ferrite", "triton", "floor"]
# The protocol floor answers as one model: the one where the protocol is most
# of the cost.
FLOOR_MODELS = ["mlp"]

sys.path.insert(0, str(ROOT / "scripts"))


def log(message: str) -> None:
    print(f"==> {message}", flush=True)


def env_list(name: str, default: list, cast=str) -> list:
    value = os.environ.get(name)
    return [cast(v) for v in value.split(",") if v] if value else default


def cpus() -> int:
    """The CPUs this process may use: affinity, bounded by a cgroup quota (as
    ferrite-server computes them)."""
    n = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        try:
            quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if quota > 0:
                n = min(n, max(1, math.ceil(quota / period)))
        except (OSError, ValueError):
            pass
    return n


# ------------------------------------------------------------------ models
def build_models() -> dict[str, Path]:
    """The three ONNX files, made once into .cache/bench/models."""
    import onnx

    import make_dynamic_batch
    import make_test_models

    out = CACHE / "models"
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.onnx" for name in MODELS}
    if not paths["mlp"].exists():
        onnx.save(make_test_models.make_mlp(), str(paths["mlp"]))
    if not paths["strings"].exists():
        onnx.save(make_test_models.make_strings(), str(paths["strings"]))
    if not paths["resnet50"].exists():
        light = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
        model = make_dynamic_batch.make_dynamic(onnx.load(str(light)))
        onnx.save(model, str(paths["resnet50"]))
    return paths


def signature(path: Path) -> tuple[list, list]:
    """(name, ONNX type string, shape) of the inputs and outputs that ONNX
    Runtime sees (initializers listed as graph inputs excluded)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = lambda v: [d if isinstance(d, int) else -1 for d in v.shape]  # noqa: E731
    return ([(i.name, i.type, shape(i)) for i in s.get_inputs()], [(o.name, o.type, shape(o)) for o in s.get_outputs()])


def ferrite_repository(repo: Path, models: dict[str, Path], threads: int) -> None:
    for name, path in models.items():
        for suffix, config in [
            ("", {"max_batch_size": MAX_BATCH[name], "max_queue_delay_microseconds": 0}),
            ("_nobatch", {"max_batch_size": 1}),
        ]:
            d = repo / (name + suffix)
            (d / "1").mkdir(parents=True, exist_ok=True)
            target = d / "1" / "model.onnx"
            if not target.exists():
                target.symlink_to(path)
            config |= {"max_queue_size": 4096, "instance_count": 1, "intra_op_threads": threads}
            (d / "ferrite.json").write_text(json.dumps(config) + "\n")


# ------------------------------------------------------------------ cells
def cell_times(model: str, concurrency: int) -> tuple[float, float]:
    """(warm-up, measured) seconds. ResNet-50's requests take ~0.1 s each on
    a small CPU, so its warm-up grows with the queue a closed loop of
    `concurrency` builds up (one full round of it before measuring)."""
    warmup = float(os.environ.get("BENCH_WARMUP", "2"))
    if model == "resnet50":
        return warmup + 0.15 * concurrency, float(os.environ.get("BENCH_RESNET_SECONDS", "8"))
    return warmup, float(os.environ.get("BENCH_SECONDS", "10"))


def plan(models: list[str], concurrency: list[int], configs: list[str],
         clients: list[str]) -> list[tuple[str, int, str, str]]:
    """(model, concurrency, configuration, client) cells in the order run."""
    cells = []
    for model in models:
        for i, c in enumerate(concurrency):
            order = []
            if LOADGEN_CLIENT in clients:
                order += [(x, LOADGEN_CLIENT) for x in configs
                          if not (x == "raw-batched" and c == 1) and (x != "floor" or model in FLOOR_MODELS)]
            if model in OUTSIDE_MODELS:
                order += [(x, client) for client in clients if client != LOADGEN_CLIENT
                          for x in OUTSIDE_CONFIGS if x in configs and (x != "floor" or model in FLOOR_MODELS)]
            cells += [(model, c, x, client) for x, client in (order if i % 2 == 0 else order[::-1])]
    return cells


def estimate(cells) -> float:
    total = 40.0  # server start-up
    for model, c, _, client in cells:
        warmup, seconds = cell_times(model, c)
        drain = 0.12 * c if model == "resnet50" else 0.2
        total += warmup + seconds + drain + (0.5 if client == LOADGEN_CLIENT else 1.5)
    return total


def run_cell(model: str, c: int, config: str, client: str, paths: dict, ports: dict, threads: int,
             bodies: dict) -> dict:
    warmup, seconds = cell_times(model, c)
    if client != LOADGEN_CLIENT:
        served = model if config != "ferrite-nobatch" else f"{model}_nobatch"
        if client == "ghz":
            result = outside_clients.ghz(ports[config]["grpc"], bodies[model]["grpc"], c, warmup, seconds)
        else:
            result = outside_clients.oha(ports[config]["http"], served, bodies[model]["http"], c, warmup, seconds)
        result.update(model=model, config=config, client=client, concurrency=c, warmup=warmup)
        return result
    argv = [str(LOADGEN), "--concurrency", str(c), "--warmup", str(warmup), "--duration", str(seconds),
            "--label", config]
    if config in ("raw", "raw-batched"):
        argv += ["--onnx", str(paths[model]), "--model", model, "--threads", str(threads)]
        if config == "raw-batched":
            argv += ["--batch-rows", str(min(c, MAX_BATCH[model]))]
    elif config in ("triton", "floor"):
        argv += ["--url", f"http://127.0.0.1:{ports[config]['grpc']}", "--model", model]
    else:
        served = model if config == "ferrite" else f"{model}_nobatch"
        argv += ["--url", f"http://127.0.0.1:{ports['ferrite']['grpc']}", "--model", served]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=warmup + seconds + 300,
                          env=os.environ | {"ORT_DYLIB_PATH": str(ORT_LIB)})
    if done.returncode != 0:
        raise SystemExit(f"ferrite-loadgen failed on {model} c={c} {config}:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(model=model, config=config, client=client, concurrency=c, warmup=warmup)
    return result


def verify(paths: dict, ports: dict) -> None:
    """One request per model to each server (tritonclient, as users call
    them), checked against onnxruntime in this process: every configuration
    measures the same computation."""
    import numpy as np
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    for model, path in paths.items():
        inputs, outputs = signature(path)
        feeds = {}
        for name, ttype, shape in inputs:
            shape = [1 if d < 0 else d for d in shape]
            if ttype == "tensor(string)":
                feeds[name] = np.array([f"text {i}" for i in range(int(np.prod(shape)))], dtype=np.object_).reshape(shape)
            else:
                feeds[name] = rng.random(shape, dtype=np.float32)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        expected = dict(zip([o[0] for o in outputs], session.run(None, feeds)))
        for server, port in ports.items():
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port['grpc']}")
            served = model
            wire = {}
            for name, ttype, _ in inputs:
                value = feeds[name]
                if server == "triton" and value.ndim == 1:
                    value = value.reshape(-1, 1)  # Triton's batch dimension plus dims [1]
                if ttype == "tensor(string)":
                    value = np.array([v.encode() for v in value.ravel()], dtype=np.object_).reshape(value.shape)
                x = grpcclient.InferInput(name, list(value.shape), "BYTES" if ttype == "tensor(string)" else "FP32")
                x.set_data_from_numpy(value)
                wire[name] = x
            answer = client.infer(served, list(wire.values()))
            for name, want in expected.items():
                got = answer.as_numpy(name)
                if got is None or got.size != want.size:
                    raise SystemExit(f"{server} answered {model} with {name} = {got!r}, expected {want!r}")
                got = got.reshape(want.shape)
                if want.dtype == np.object_:
                    got = np.array([g.decode() if isinstance(g, bytes) else g for g in got.ravel()]).reshape(want.shape)
                    ok = (got == want.astype(str)).all()
                else:
                    ok = np.allclose(got, want, rtol=1e-4, atol=1e-5)
                if not ok:
                    raise SystemExit(f"{server} answered {model} with {name} = {got!r}, expected {want!r}")
            client.close()
    log(f"checked: {', '.join(ports)} answer {', '.join(paths)} as onnxruntime does")


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": cpus(),
        "avx512": "avx512f" in flags,
        "memory_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "accelerator": "none (CPU execution provider)",
    }


def ort_version() -> str:
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        if line.startswith("onnxruntime=="):
            return line.split("==", 1)[1]
    return "?"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def soak() -> int:
    """`make bench-soak`: ferrite-server with batching on the tiny MLP at
    concurrency 64 for BENCH_SOAK_SECONDS (600), its resident memory sampled
    every 10 s; writes bench/soak.json (read by bench/report.py)."""
    seconds = float(os.environ.get("BENCH_SOAK_SECONDS", "600"))
    warmup = 30.0
    threads = cpus()
    paths = {"mlp": build_models()["mlp"]}
    run_dir = CACHE / "soak"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    ferrite_repository(run_dir / "ferrite-repo", paths, threads)
    grpc, http = free_port(), free_port()
    log(f"soak: ferrite-server, mlp with batching, concurrency 64, {warmup:.0f} s warm-up + {seconds:.0f} s")
    server = Server(
        "ferrite-server",
        [str(SERVER), "serve", "--host", "127.0.0.1", "--model-repository", str(run_dir / "ferrite-repo"),
         "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(free_port())],
        os.environ | {"ORT_DYLIB_PATH": str(ORT_LIB), "RUST_LOG": "warn"},
        run_dir / "ferrite-server.log",
    )
    samples = []
    try:
        server.wait_ready(http, ["mlp"], timeout=120)
        load = subprocess.Popen(
            [str(LOADGEN), "--url", f"http://127.0.0.1:{grpc}", "--model", "mlp", "--concurrency", "64",
             "--warmup", str(warmup), "--duration", str(seconds), "--label", "soak"],
            stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        while load.poll() is None:
            t = time.monotonic() - t0
            samples.append({"seconds": round(t, 1), "rss_bytes": server.rss_bytes()})
            if len(samples) % 6 == 1:
                print(f"[soak {t / 60:4.1f} / {(warmup + seconds) / 60:.1f} min] ferrite-server RSS "
                      f"{samples[-1]['rss_bytes'] / 2**20:.1f} MiB", flush=True)
            time.sleep(10)
        result = json.loads(load.stdout.read().strip().splitlines()[-1])
    finally:
        server.stop()
    measured = [x["rss_bytes"] for x in samples if x["seconds"] >= warmup]
    out = {"started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "model": "mlp",
           "concurrency": 64, "warmup_seconds": warmup, "seconds": seconds, "loadgen": result, "samples": samples,
           "load_average_after": [round(x, 2) for x in os.getloadavg()],
           "rss_after_warmup_bytes": measured[0], "rss_max_bytes": max(measured), "rss_last_bytes": measured[-1]}
    (ROOT / "bench" / "soak.json").write_text(json.dumps(out, indent=1) + "\n")
    log(f"soak: RSS {measured[0] / 2**20:.1f} MiB after warm-up, max {max(measured) / 2**20:.1f} MiB, "
        f"last {measured[-1] / 2**20:.1f} MiB ({result['throughput_rps']:.0f} req/s); wrote bench/soak.json")
    if os.environ.get("BENCH_REPORT", "1") == "1" and (ROOT / "bench" / "results.json").exists():
        subprocess.run([str(PY), str(ROOT / "bench" / "report.py"), str(ROOT / "bench" / "results.json")], check=True)
    return 0


def main() -> int:
    if sys.argv[1:] == ["soak"]:
        return soak()
    models = env_list("BENCH_MODELS", MODELS)
    concurrency = env_list("BENCH_CONCURRENCY", CONCURRENCY, int)
    configs = env_list("BENCH_CONFIGS", CONFIGS)
    results_path = Path(os.environ.get("BENCH_RESULTS", ROOT / "bench" / "results.json"))
    for f in (LOADGEN, SERVER, ORT_LIB) + ((FLOOR,) if "floor" in configs else ()):
        if not f.exists():
            raise SystemExit(f"{f} is missing: run `make venv ort release` first")
    clients = env_list("BENCH_CLIENTS", CLIENTS)
    outside_clients.check_installed(clients)
    cells = plan(models, concurrency, configs, clients)
    log(f"{len(cells)} cells ({', '.join(models)} x concurrency {concurrency} x {', '.join(configs)}; "
        f"clients {', '.join(clients)}); "
        f"estimated {estimate(cells) / 60:.1f} min after set-up")
    threads = cpus()
    # Let the compiler that `make release` may just have run finish weighing on
    # the load average (at most 2 minutes).
    settle = time.monotonic() + float(os.environ.get("BENCH_SETTLE_SECONDS", "120"))
    if os.getloadavg()[0] >= 1.5 and time.monotonic() < settle:
        log(f"waiting for the machine to settle (1-minute load average {os.getloadavg()[0]:.2f})")
        while os.getloadavg()[0] >= 1.5 and time.monotonic() < settle:
            time.sleep(5)
    started_at = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()

    paths = {m: p for m, p in build_models().items() if m in models}
    run_dir = CACHE / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    servers: dict[str, Server] = {}
    ports: dict[str, dict[str, int]] = {}
    versions = {}
    try:
        if any(c.startswith("ferrite") for c in configs):
            ferrite_repository(run_dir / "ferrite-repo", paths, threads)
            grpc, http = free_port(), free_port()
            log(f"starting ferrite-server (gRPC 127.0.0.1:{grpc})")
            servers["ferrite"] = Server(
                "ferrite-server",
                [str(SERVER), "serve", "--host", "127.0.0.1", "--model-repository", str(run_dir / "ferrite-repo"),
                 "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(free_port())],
                os.environ | {"ORT_DYLIB_PATH": str(ORT_LIB), "RUST_LOG": "warn"},
                run_dir / "ferrite-server.log",
            )
            servers["ferrite"].wait_ready(http, list(paths), timeout=120)
            ports["ferrite"] = {"grpc": grpc, "http": http}
            versions["ferrite"] = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http}/v2")).get("version")
        if "triton" in configs:
            triton = triton_peer.setup(CACHE, PY)
            served = {m: (p, signature(p), MAX_BATCH[m]) for m, p in paths.items()}
            triton_peer.repository(run_dir / "triton-repo", served, threads, triton["site"])
            grpc, http = free_port(), free_port()
            log(f"starting tritonserver (gRPC 127.0.0.1:{grpc}; loading models takes a while)")
            env = os.environ | {"LD_LIBRARY_PATH": str(triton["libs"])}
            servers["triton"] = Server(
                "tritonserver",
                [str(triton["binary"]), "--model-repository", str(run_dir / "triton-repo"),
                 "--backend-directory", str(triton["backends"]),
                 "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
                 "--http-address", "127.0.0.1", "--http-port", str(http),
                 "--metrics-address", "127.0.0.1", "--metrics-port", str(free_port()),
                 "--allow-gpu-metrics", "false", "--log-verbose", "0"],
                env,
                run_dir / "tritonserver.log",
            )
            servers["triton"].wait_ready(http, list(paths), timeout=300)
            ports["triton"] = {"grpc": grpc, "http": http}
            versions["triton"] = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http}/v2")).get("version")
        floor_models = [m for m in FLOOR_MODELS if m in paths]
        if "floor" in configs and floor_models:
            log(f"starting ferrite-floor, the protocol floor, answering as {floor_models[0]}")
            servers["floor"], ports["floor"] = start_floor(floor_models[0], signature(paths[floor_models[0]]),
                                                           run_dir / "ferrite-floor.log")
            versions["floor"] = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ports['floor']['http']}/v2"))[
                "version"]

        verify(paths, {name: port for name, port in ports.items() if name != "floor"})  # the floor computes nothing
        import numpy as np

        bodies = {m: outside_clients.write_requests(run_dir / "requests", m, signature(paths[m])[0],
                                                    np.random.default_rng(0))
                  for m in OUTSIDE_MODELS if m in paths}
        results = []
        memory = {name: [] for name in servers}
        t0 = time.monotonic()
        for n, (model, c, config, client) in enumerate(cells, 1):
            result = run_cell(model, c, config, client, paths, ports, threads, bodies)
            result["load_average_1min"] = round(os.getloadavg()[0], 2)
            results.append(result)
            elapsed = time.monotonic() - t0
            left = estimate(cells[n:]) - 40
            ms = lambda us: f"{us / 1000:.2f} ms"  # noqa: E731
            failed = f", {result['failed']} FAILED ({result['first_error']})" if result["failed"] else ""
            print(f"[{n:2}/{len(cells)} {elapsed / 60:4.1f} min, ~{left / 60:.1f} min left] {model:8} c={c:<2} "
                  f"{config:15} {client:15} {result['throughput_rps']:10.1f} req/s  p50 {ms(result['p50_us'])}  "
                  f"p99 {ms(result['p99_us'])}{failed}", flush=True)
            for name, server in servers.items():
                memory[name].append({"after_cell": n, "rss_bytes": server.rss_bytes()})
    finally:
        for server in servers.values():
            server.stop()

    out = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_seconds": round((dt.datetime.now(dt.timezone.utc) - started_at).total_seconds(), 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
        "revision": git_revision(),
        "versions": versions | {"onnxruntime": ort_version(), "pytriton": triton_peer.PYTRITON_VERSION},
        "threads": threads,
        "max_batch_size": {m: MAX_BATCH[m] for m in models},
        "models": models,
        "concurrency": concurrency,
        "configs": configs,
        "clients": clients,
        "results": results,
        "memory": memory,
    }
    results_path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"results in {results_path.relative_to(ROOT) if results_path.is_relative_to(ROOT) else results_path}")
    if os.environ.get("BENCH_REPORT", "1") == "1":
        subprocess.run([str(PY), str(ROOT / "bench" / "report.py"), str(results_path)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
