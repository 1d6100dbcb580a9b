"""fastembed in process, the limit of `make bench-embed`: run by
bench/embed_bench.py with the peers' virtualenv (.cache/bench/embed-venv).

The model is registered as a custom fastembed model (mean pooling, L2
normalization, 384 dimensions) whose files are the benchmark's model
directory (`specific_model_path`): the same model.onnx and tokenizer as the
servers, nothing downloaded. One TextEmbedding with `threads` ONNX Runtime
threads, called back to back from one thread.

    python fastembed_run.py measure MODEL_DIR --threads 2 --kind short --batch 32 --warmup 2 --seconds 5
    python fastembed_run.py embed MODEL_DIR --threads 2 < texts.json > vectors.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import embed_workload  # noqa: E402

NAME = "ferrite-bench/all-minilm-l6-v2"


def load(model_dir: str, threads: int):
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    TextEmbedding.add_custom_model(model=NAME, pooling=PoolingType.MEAN, normalization=True,
                                   sources=ModelSource(hf=NAME), dim=384, model_file="model.onnx")
    return TextEmbedding(model_name=NAME, specific_model_path=model_dir, threads=threads,
                         providers=["CPUExecutionProvider"])


def measure(model, kind: str, batch: int, warmup: float, seconds: float) -> dict:
    pool = embed_workload.texts(kind)
    chunks = [pool[i:i + batch] for i in range(0, len(pool) - batch + 1, batch)]
    latencies, i = [], 0

    def call() -> float:
        nonlocal i
        chunk = chunks[i % len(chunks)]
        i += 1
        t0 = time.perf_counter()
        out = list(model.embed(chunk, batch_size=batch))
        assert len(out) == len(chunk)
        return time.perf_counter() - t0

    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        call()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 5:
        latencies.append(call())
    measured = time.perf_counter() - start
    lat = sorted(latencies)
    pick = lambda p: lat[min(len(lat) - 1, max(0, math.ceil(p / 100 * len(lat)) - 1))] * 1e3  # noqa: E731
    return {"requests": len(lat), "failed": 0, "first_error": None, "seconds": round(measured, 3),
            "requests_per_s": len(lat) / measured, "sentences_per_s": len(lat) * batch / measured,
            "p50_ms": pick(50), "p99_ms": pick(99), "mean_ms": sum(lat) / len(lat) * 1e3}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["measure", "embed"])
    p.add_argument("model_dir")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--kind", default="short")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--seconds", type=float, default=5)
    a = p.parse_args()
    model = load(a.model_dir, a.threads)
    if a.mode == "embed":
        texts = json.load(sys.stdin)
        print(json.dumps([v.tolist() for v in model.embed(texts)]))
    else:
        print(json.dumps(measure(model, a.kind, a.batch, a.warmup, a.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
