"""`make gpu-check` without a GPU: it must stop at once, non-zero, saying why.

    .venv/bin/python -m pytest -q bench/gpu/test_gpu_check.py

On a machine whose driver reports a CUDA device the preflight must pass
instead (the full check is `make gpu-check` itself, minutes long).
"""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
import gpu_check  # noqa: E402

SCRIPT = [sys.executable, str(HERE / "gpu_check.py")]


def test_preflight_tells_whether_a_gpu_is_here():
    count, why = gpu_check.gpu_count()
    done = subprocess.run(SCRIPT + ["--preflight"], capture_output=True, text=True, timeout=60)
    if count == 0:
        assert why, "no GPU but no reason given"
        assert done.returncode == gpu_check.NO_GPU, (done.returncode, done.stderr)
        assert "gpu-check: no NVIDIA GPU here" in done.stderr and why in done.stderr, done.stderr
        assert "nothing was run" in done.stderr
    else:
        assert done.returncode == 0, done.stderr


def test_make_gpu_check_fails_loudly_without_a_gpu():
    count, _ = gpu_check.gpu_count()
    if count > 0:
        # A GPU is here: the preflight passed above, `make gpu-check` is the real run.
        done = subprocess.run(SCRIPT + ["--preflight"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    done = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode != 0
    assert "gpu-check: no NVIDIA GPU here" in done.stderr, done.stderr[-2000:]
    # It stopped before building or downloading anything.
    assert "cargo" not in done.stdout and "pip" not in done.stdout, done.stdout[-2000:]


def test_the_gpu_section_replaces_itself(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n\n## CPU\n\ncpu text\n\n## Micro LLMs\n\nllm text\n")
    monkeypatch.setattr(gpu_check, "DOCS", docs)
    cells = [{"config": c, "batch": 1, "concurrency": 64, "images_per_s": v}
             for c, v in (("ferrite", 900.0), ("raw", 1000.0), ("triton", 600.0))]
    results = {"gpu": "NVIDIA H200", "date": "2026-12-03", "resnet50": cells}
    gpu_check.update_benchmarks_md(results)
    gpu_check.update_benchmarks_md(results)
    text = (docs / "benchmarks.md").read_text()
    assert text.count("## GPU (NVIDIA)") == 1
    assert "ferrite / raw ONNX Runtime CUDA = 0.90" in text and "ferrite / Triton = 1.50" in text
    assert "llm text" in text and "cpu text" in text


def test_report_writes_the_tables_and_the_plot(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text("# Benchmarks\n")
    monkeypatch.setattr(gpu_check, "DOCS", docs)
    cells = [{"config": config, "batch": b, "concurrency": c, "images_per_s": 100.0 * b + c + i,
              "p50_ms": 1.0, "p99_ms": 2.0}
             for i, config in enumerate(gpu_check.CONFIGS) for b in gpu_check.BATCHES for c in gpu_check.CONCURRENCY]
    llm = [{"provider": "cuda", "streams": n, "aggregate_tok_s": 50.0 * n, "ttft_median_ms": 20.0}
           for n in gpu_check.LLM_STREAMS]
    results = {"date": "2026-12-03", "gpu": "NVIDIA H200, 570.1, 143771 MiB", "onnxruntime": "1.31.1",
               "suite": {"summary": "120 passed in 60.0s"},
               "correctness": {"resnet50": {"max_abs_diff": 1e-4, "same_top1": True},
                               "smollm2": {"cuda": "The capital of France is Paris.", "cpu": "same"}},
               "resnet50": cells, "llm": llm}
    gpu_check.report(results)
    page = (docs / "benchmarks-gpu.md").read_text()
    assert "| 64 | 64 | 6464 (1.0 / 2.0) | 6465 (1.0 / 2.0) | 6466 (1.0 / 2.0) |" in page, page
    assert "| cuda | 64 | 3200 | 20 |" in page and "120 passed" in page and "Paris" in page
    assert (docs / "bench-gpu-resnet50.png").stat().st_size > 10_000
    assert "## GPU (NVIDIA)" in (docs / "benchmarks.md").read_text()
