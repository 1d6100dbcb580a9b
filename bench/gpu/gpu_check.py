#!/usr/bin/env python3
"""`make gpu-check`: ferrite on an NVIDIA GPU, proven and measured in a few minutes.

Needs a machine with an NVIDIA GPU and its driver. Elsewhere it stops at once
with exit status 2 and says why (`--preflight` does only that check, with the
standard library, before `make` builds anything).

Steps, all with ONNX Runtime's CUDA provider from the ferrite-server-cuda
image's libraries (.cache/cuda/lib, `make cuda-libs`):

  1. the provider starts: ferrite-server loads the demo model with
     --execution-provider cuda and reports `execution_provider: cuda` (no
     fallback flag: a provider that cannot start fails the load)
  2. the tritonclient suite's model checks on CUDA: server/tests/python's
     test_onnx_models.py (every real model shipped in the onnx wheel against
     its reference output) and test_grpc.py, with every server started with
     --execution-provider cuda (FERRITE_TEST_SERVER_ARGS); tolerances rtol
     1e-2 / atol 1e-3, since cuDNN's convolutions (TF32 on Ampere and later)
     do not round like the CPU's
  3. ResNet-50 and SmolLM2 against the CPU: the same inputs through a CUDA and
     a CPU server; ResNet-50's probabilities within rtol 1e-2 / atol 1e-2 and
     the same top-1 class; SmolLM2's greedy answers to a fixed question must
     both name Paris (whether the texts are identical is recorded)
  4. benchmark cells (GPU_CHECK_SECONDS each, default 5): ResNet-50 with
     requests of 1, 8 and 64 images at concurrency 1, 8 and 64, for
       ferrite      ferrite-server on CUDA, dynamic batching (max batch 64 images)
       raw          ONNX Runtime CUDA in process (ferrite-loadgen --onnx
                    --execution-provider cuda; with 1-image requests, each call
                    joins min(c, 64) of them: the ideal batching server)
       triton       tritonserver 2.51 (nvidia-pytriton) with its Python backend
                    running onnxruntime-gpu on CUDA, dynamic batcher
     and SmolLM2-135M tokens/s at 1, 16 and 64 streams (128 tokens each,
     ignore_eos) on ferrite-server's OpenAI API, on CUDA and on the CPU
  5. bench/gpu/results.json, docs/benchmarks-gpu.md, docs/bench-gpu-resnet50.png,
     and the "## GPU (NVIDIA)" section of docs/benchmarks.md

Knobs (environment): GPU_CHECK_SECONDS (5), GPU_CHECK_WARMUP (2),
GPU_CHECK_STEPS (all: provider,suite,correctness,resnet50,llm),
GPU_CHECK_CONFIGS (ferrite,raw,triton).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CUDA_LIB = ROOT / ".cache" / "cuda" / "lib"
ORT_GPU = CUDA_LIB / "libonnxruntime.so"
RESULTS = ROOT / "bench" / "gpu" / "results.json"
DOCS = ROOT / "docs"
NO_GPU = 2

BATCHES = [1, 8, 64]
CONCURRENCY = [1, 8, 64]
LLM_STREAMS = [1, 16, 64]
LLM_TOKENS = 128
MAX_BATCH = 64
CONFIGS = ["ferrite", "raw", "triton"]
STEPS = ["provider", "suite", "correctness", "resnet50", "llm"]


def log(message: str) -> None:
    print(f"==> {message}", flush=True)


# ------------------------------------------------------------------ preflight
def gpu_count() -> tuple[int, str]:
    """(number of CUDA devices, why 0): asks the driver itself (libcuda.so.1,
    cuInit, cuDeviceGetCount), which is what ONNX Runtime's CUDA provider will
    do; nvidia-smi alone could be present without a usable device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return 0, f"the NVIDIA driver's libcuda.so.1 cannot be loaded ({e})"
    rc = cuda.cuInit(0)
    if rc != 0:
        return 0, f"cuInit failed with CUDA error {rc} (100: no CUDA-capable device; 35: driver too old)"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return 0, f"cuDeviceGetCount failed with CUDA error {rc}"
    if count.value == 0:
        return 0, "the driver reports no CUDA device"
    return count.value, ""


def require_gpu() -> None:
    n, why = gpu_count()
    if n == 0:
        print(
            f"gpu-check: no NVIDIA GPU here: {why}.\n"
            "gpu-check proves and measures the CUDA provider and needs a machine with an NVIDIA GPU and its "
            "driver (docs/gpu.md); nothing was run. The CPU-side checks of the GPU path are in `make test`.",
            file=sys.stderr,
        )
        sys.exit(NO_GPU)
    log(f"{n} CUDA device(s): {gpu_name()}")


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out.replace("\n", "; ") or "nvidia-smi printed nothing"
    except (OSError, subprocess.TimeoutExpired):
        return "nvidia-smi not available"


# ------------------------------------------------------------------ helpers
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "server" / "tests" / "python"))


def gpu_env() -> dict:
    """The environment of everything that runs ONNX Runtime on CUDA."""
    return os.environ | {
        "ORT_DYLIB_PATH": str(ORT_GPU),
        "LD_LIBRARY_PATH": f"{CUDA_LIB}:{os.environ.get('LD_LIBRARY_PATH', '')}".rstrip(":"),
    }


def server_binary() -> Path:
    return ROOT / "target" / "release" / "ferrite-server"


class Served:
    """ferrite-server on free loopback ports (bench/servers.py's Server)."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path):
        from servers import free_port

        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        argv = [str(server_binary()), "serve", "--host", "127.0.0.1", "--http-port", str(self.ports["http"]),
                "--grpc-port", str(self.ports["grpc"]), "--metrics-port", str(self.ports["metrics"]), *args]
        self.argv, self.env, self.log_path, self.name = argv, env, logs / f"{name}.log", name
        self.server = None

    def __enter__(self):
        from servers import Server

        self.server = Server(self.name, self.argv, self.env, self.log_path)
        self.server.wait_ready(self.ports["http"], [], timeout=600)
        return self

    def __exit__(self, *exc):
        self.server.stop()


def model_config(port: int, model: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{model}/config", timeout=30) as r:
        return json.loads(r.read())


def resnet50_model() -> Path:
    import bench

    return bench.build_models()["resnet50"]


def smollm2_dir() -> Path:
    d = ROOT / ".cache" / "models" / "smollm2-135m-instruct-fp32"
    if not (d / "llm.json").exists():
        raise SystemExit(f"gpu-check: {d} missing: `make models` builds it")
    return d


# ------------------------------------------------------------------ steps
def step_provider(logs: Path, results: dict) -> None:
    with Served("provider", ["--execution-provider", "cuda"], gpu_env(), logs) as s:
        params = model_config(s.ports["http"], "demo").get("parameters", {})
        provider = (params.get("execution_provider") or {}).get("string_value")
    if provider != "cuda":
        raise SystemExit(f"gpu-check: the demo model runs on {provider!r}, not cuda")
    results["provider"] = {"demo": provider}
    log("the CUDA provider starts; the demo model reports execution_provider=cuda")


def step_suite(logs: Path, results: dict) -> None:
    env = gpu_env() | {
        "FERRITE_SERVER_BIN": str(server_binary()),
        "FERRITE_TEST_SERVER_ARGS": "--execution-provider cuda",
        "FERRITE_TEST_RTOL": "1e-2",
        "FERRITE_TEST_ATOL": "1e-3",
        "CI": "true",  # nothing may be skipped
    }
    tests = ["server/tests/python/test_onnx_models.py", "server/tests/python/test_grpc.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *tests], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    (logs / "suite.log").write_text(done.stdout + done.stderr)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    results["suite"] = {"tests": tests, "summary": tail, "ok": done.returncode == 0}
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: the tritonclient suite failed on CUDA: {tail} (log: {logs / 'suite.log'})")
    log(f"tritonclient suite on CUDA: {tail}")


def step_correctness(logs: Path, results: dict) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    model = resnet50_model()
    x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    outs = {}
    for provider in ("cuda", "cpu"):
        env = gpu_env() if provider == "cuda" else os.environ | {"ORT_DYLIB_PATH": str(ORT_GPU)}
        with Served(f"resnet50-{provider}", ["--model", f"resnet50={model}", "--execution-provider", provider],
                    env, logs) as s:
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{s.ports['grpc']}")
            meta = c.get_model_metadata("resnet50")
            inp = grpcclient.InferInput(meta.inputs[0].name, list(x.shape), "FP32").set_data_from_numpy(x)
            outs[provider] = c.infer("resnet50", [inp]).as_numpy(meta.outputs[0].name)
            c.close()
    diff = float(np.max(np.abs(outs["cuda"] - outs["cpu"])))
    same_top1 = bool((outs["cuda"].argmax(1) == outs["cpu"].argmax(1)).all())
    results["correctness"] = {"resnet50": {"max_abs_diff": diff, "same_top1": same_top1}}
    np.testing.assert_allclose(outs["cuda"], outs["cpu"], rtol=1e-2, atol=1e-2)
    if not same_top1:
        raise SystemExit("gpu-check: ResNet-50's top-1 classes differ between CUDA and the CPU")
    log(f"ResNet-50 CUDA vs CPU: max |diff| {diff:.2e}, same top-1 on 8 images")

    answers = {}
    question = "What is the capital of France? Answer in one sentence."
    for provider in ("cuda", "cpu"):
        env = gpu_env() if provider == "cuda" else os.environ | {"ORT_DYLIB_PATH": str(ORT_GPU)}
        with Served(f"smollm2-{provider}", ["--model", f"smol={smollm2_dir()}", "--execution-provider", provider],
                    env, logs) as s:
            answers[provider] = chat(s.ports["http"], question)
    # fp32 on both; cuBLAS (TF32) may still flip a late near-tie, so the
    # text is recorded and the fact must hold.
    results["correctness"]["smollm2"] = answers | {"same_text": answers["cuda"] == answers["cpu"]}
    if "Paris" not in answers["cuda"] or "Paris" not in answers["cpu"]:
        raise SystemExit(f"gpu-check: SmolLM2's greedy answers miss Paris: {answers}")
    log(f"SmolLM2 on CUDA: {answers['cuda']!r} (CPU: {answers['cpu']!r})")


def chat(port: int, question: str) -> str:
    import urllib.request

    body = json.dumps({"model": "smol", "messages": [{"role": "user", "content": question}],
                       "max_tokens": 24, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def loadgen(argv: list[str], env: dict) -> dict:
    exe = ROOT / "target" / "release" / "ferrite-loadgen"
    done = subprocess.run([str(exe), *argv], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: ferrite-loadgen {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_resnet50(logs: Path, results: dict, configs: list[str]) -> None:
    model = resnet50_model()
    warmup = float(os.environ.get("GPU_CHECK_WARMUP", "2"))
    seconds = float(os.environ.get("GPU_CHECK_SECONDS", "5"))
    cells = []
    repo = logs / "repository"
    (repo / "resnet50" / "1").mkdir(parents=True, exist_ok=True)
    target = repo / "resnet50" / "1" / "model.onnx"
    if not target.exists():
        target.symlink_to(model)
    (repo / "resnet50" / "ferrite.json").write_text(json.dumps(
        {"max_batch_size": MAX_BATCH, "max_queue_delay_microseconds": 0, "max_queue_size": 8192,
         "execution_provider": "cuda"}) + "\n")
    servers = {}
    try:
        if "ferrite" in configs:
            servers["ferrite"] = Served("resnet50-bench", ["--model-repository", str(repo),
                                        "--max-message-bytes", str(64 << 20)], gpu_env(), logs).__enter__()
        if "triton" in configs:
            servers["triton"] = start_triton(logs, model)
        for b in BATCHES:
            for i, c in enumerate(CONCURRENCY):
                order = configs if i % 2 == 0 else configs[::-1]
                for config in order:
                    argv = ["--concurrency", str(c), "--warmup", str(warmup + 0.02 * c), "--duration", str(seconds),
                            "--dynamic-dim", str(b), "--label", config]
                    if config == "raw":
                        argv += ["--onnx", str(model), "--model", "resnet50", "--execution-provider", "cuda"]
                        if b == 1 and c > 1:
                            argv += ["--batch-rows", str(min(c, MAX_BATCH))]
                    else:
                        argv += ["--url", f"http://127.0.0.1:{servers[config].ports['grpc']}", "--model", "resnet50"]
                    r = loadgen(argv, gpu_env())
                    if r["failed"]:
                        raise SystemExit(f"gpu-check: {config} batch {b} c={c}: {r['failed']} failed requests, "
                                         f"first: {r['first_error']}")
                    # Each answered request carries b images (raw with
                    # --batch-rows answers one 1-image client per row).
                    r.update(model="resnet50", config=config, batch=b, concurrency=c,
                             images_per_s=r["throughput_rps"] * b,
                             p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000)
                    cells.append(r)
                    log(f"resnet50 batch {b} c={c} {config}: {r['images_per_s']:.0f} images/s, "
                        f"p50 {r['p50_ms']:.2f} ms")
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)
    results["resnet50"] = cells


def start_triton(logs: Path, model: Path):
    """tritonserver (nvidia-pytriton) with bench/triton/model.py on onnxruntime-gpu."""
    import bench
    import triton_peer
    from servers import Server, free_port

    cache = ROOT / ".cache" / "bench"
    peer = triton_peer.setup(cache, ROOT / ".venv" / "bin" / "python",
                             requirements=ROOT / "bench" / "gpu" / "triton-requirements.txt", venv_name="triton-gpu-venv",
                             find_links=ROOT / ".cache" / "cuda" / "wheels")
    repo = logs / "triton-repository"
    sig = bench.signature(model)
    triton_peer.repository(repo, {"resnet50": (model, sig, MAX_BATCH)}, 0, peer["site"],
                           providers="CUDAExecutionProvider,CPUExecutionProvider")
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    argv = [str(peer["binary"]), f"--model-repository={repo}", f"--backend-directory={peer['backends']}",
            f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}", f"--metrics-port={ports['metrics']}",
            "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--log-error=true"]
    env = gpu_env() | {"LD_LIBRARY_PATH": f"{peer['libs']}:{CUDA_LIB}"}
    server = Server("triton-gpu", argv, env, logs / "triton-gpu.log")
    server.wait_ready(ports["http"], ["resnet50"], timeout=600)

    class Handle:
        pass

    h = Handle()
    h.ports = ports
    h.__exit__ = lambda *a: server.stop()
    return h


def step_llm(logs: Path, results: dict) -> None:
    import llm_load

    cells = []
    for provider in ("cuda", "cpu"):
        env = gpu_env() if provider == "cuda" else os.environ | {"ORT_DYLIB_PATH": str(ORT_GPU)}
        args = ["--model", f"smol={smollm2_dir()}", "--execution-provider", provider, "--llm-allow-ignore-eos",
                "--max-batch-size", str(max(LLM_STREAMS))]
        with Served(f"smollm2-bench-{provider}", args, env, logs) as s:
            url = f"http://127.0.0.1:{s.ports['http']}"
            llm_load.one_stream(url, "smol", 8, llm_load.PROMPT)
            for n in LLM_STREAMS if provider == "cuda" else LLM_STREAMS[:2]:
                r = llm_load.run(url, "smol", n, 1, LLM_TOKENS)
                r.update(provider=provider, streams=n)
                cells.append(r)
                log(f"SmolLM2 {provider} {n} streams: {r['aggregate_tok_s']:.0f} tokens/s, "
                    f"TTFT p50 {r['ttft_median_ms']:.0f} ms")
    results["llm"] = cells


# ------------------------------------------------------------------ report
def ratio_lines(cells: list[dict]) -> list[str]:
    by = {(r["config"], r["batch"], r["concurrency"]): r for r in cells}
    lines = []
    for b in BATCHES:
        f, raw, tri = by.get(("ferrite", b, 64)), by.get(("raw", b, 64)), by.get(("triton", b, 64))
        if f and raw:
            lines.append(f"- batch {b}, c=64: ferrite / raw ONNX Runtime CUDA = "
                         f"{f['images_per_s'] / max(raw['images_per_s'], 1e-9):.2f} (target 0.9)")
        if f and tri:
            lines.append(f"- batch {b}, c=64: ferrite / Triton = "
                         f"{f['images_per_s'] / max(tri['images_per_s'], 1e-9):.2f} (target 1.2)")
    return lines


def report(results: dict) -> None:
    cells = results.get("resnet50", [])
    lines = ["# GPU benchmark (NVIDIA)", "",
             f"Generated by `make gpu-check` (bench/gpu/gpu_check.py) on {results['date']}, {results['gpu']}, "
             f"ONNX Runtime {results['onnxruntime']} (CUDA provider), from bench/gpu/results.json.", ""]
    if "suite" in results:
        lines += [f"tritonclient model checks on CUDA: {results['suite']['summary']}.", ""]
    if "correctness" in results:
        c = results["correctness"]
        lines += [f"ResNet-50 CUDA vs CPU: max |diff| {c['resnet50']['max_abs_diff']:.2e}, same top-1: "
                  f"{c['resnet50']['same_top1']}. SmolLM2 greedy answer on CUDA: "
                  f"{c.get('smollm2', {}).get('cuda', '')!r}.", ""]
    if cells:
        lines += ["## ResNet-50: images/s (p50 / p99 ms per request)", "",
                  "| batch | c | " + " | ".join(sorted({r['config'] for r in cells})) + " |",
                  "|---|---|" + "---|" * len({r['config'] for r in cells})]
        by = {(r["config"], r["batch"], r["concurrency"]): r for r in cells}
        for b in BATCHES:
            for c in CONCURRENCY:
                row = []
                for config in sorted({r["config"] for r in cells}):
                    r = by.get((config, b, c))
                    row.append(f"{r['images_per_s']:.0f} ({r.get('p50_ms', 0):.1f} / {r.get('p99_ms', 0):.1f})"
                               if r else "-")
                lines.append(f"| {b} | {c} | " + " | ".join(row) + " |")
        lines += ["", *ratio_lines(cells), "", "![ResNet-50 on the GPU](bench-gpu-resnet50.png)", ""]
        plot(cells)
    if results.get("llm"):
        lines += ["## SmolLM2-135M (fp32): tokens/s", "", "| provider | streams | tokens/s | TTFT p50 ms |",
                  "|---|---|---|---|"]
        lines += [f"| {r['provider']} | {r['streams']} | {r['aggregate_tok_s']:.0f} | {r['ttft_median_ms']:.0f} |"
                  for r in results["llm"]]
        lines.append("")
    (DOCS / "benchmarks-gpu.md").write_text("\n".join(lines))
    update_benchmarks_md(results)
    log(f"wrote {DOCS / 'benchmarks-gpu.md'} and docs/benchmarks.md's GPU section")


def plot(cells: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(4 * len(BATCHES), 3.5), sharey=False)
    for ax, b in zip(axes, BATCHES):
        for config in sorted({r["config"] for r in cells}):
            pts = sorted((r["concurrency"], r["images_per_s"]) for r in cells if r["config"] == config and r["batch"] == b)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=config)
        ax.set_xscale("log", base=2)
        ax.set_title(f"ResNet-50, {b} image(s) per request")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("images/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "bench-gpu-resnet50.png", dpi=110)


def gpu_summary(results: dict) -> str:
    lines = ["## GPU (NVIDIA)", "",
             f"`make gpu-check` on {results['gpu']} ({results['date']}); the full table in "
             "[benchmarks-gpu.md](benchmarks-gpu.md).", ""]
    lines += ratio_lines(results.get("resnet50", []))
    return "\n".join(lines) + "\n"


def update_benchmarks_md(results: dict) -> None:
    """Replace the "## GPU (NVIDIA)" section of docs/benchmarks.md (to the next
    section or the end), or append it."""
    path = DOCS / "benchmarks.md"
    text = path.read_text()
    section = gpu_summary(results)
    m = re.search(r"^## GPU \(NVIDIA\)\n.*?(?=^## |\Z)", text, re.M | re.S)
    if m:
        text = text[:m.start()] + section + ("\n" if text[m.end():] else "") + text[m.end():]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str]) -> int:
    if "--preflight" in argv:
        require_gpu()
        return 0
    require_gpu()
    if not ORT_GPU.exists():
        raise SystemExit(f"gpu-check: {ORT_GPU} missing: `make cuda-libs` stages it")
    steps = os.environ.get("GPU_CHECK_STEPS", ",".join(STEPS)).split(",")
    configs = os.environ.get("GPU_CHECK_CONFIGS", ",".join(CONFIGS)).split(",")
    logs = ROOT / ".cache" / "gpu-check"
    logs.mkdir(parents=True, exist_ok=True)
    results = {"date": dt.date.today().isoformat(), "gpu": gpu_name(),
               "onnxruntime": re.sub(r"^onnxruntime-gpu==", "", next(
                   (l.split()[0] for l in (ROOT / "images" / "cuda" / "requirements.txt").read_text().splitlines()
                    if l.startswith("onnxruntime-gpu==")), "?"))}
    started = time.monotonic()
    for step in steps:
        log(f"step {step}")
        if step == "provider":
            step_provider(logs, results)
        elif step == "suite":
            step_suite(logs, results)
        elif step == "correctness":
            step_correctness(logs, results)
        elif step == "resnet50":
            step_resnet50(logs, results, configs)
        elif step == "llm":
            step_llm(logs, results)
        else:
            raise SystemExit(f"gpu-check: unknown step {step!r} (GPU_CHECK_STEPS: {','.join(STEPS)})")
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    log(f"gpu-check passed in {time.monotonic() - started:.0f} s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
