#!/usr/bin/env python3
"""Speed of a converted decoder in onnxruntime (Python, CPU): prefill of a 40-token
prompt and greedy decode tokens/s at batch 1 and 16 (64 new tokens after the prompt).

  python models/bench_graph.py .cache/models/smollm2-135m-instruct-int4 [--threads 2]

Reports the median and the best of --repeat runs (the best is the least disturbed by
other load on a shared machine).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm_reference import OnnxLlm  # noqa: E402


def run(m, batch, prompt_len, new_tokens):
    rng = np.random.RandomState(batch)
    rows = [list(rng.randint(100, 40000, size=prompt_len)) for _ in range(batch)]
    t0 = time.perf_counter()
    logits, past, mask, nxt = m.prefill(rows)
    t1 = time.perf_counter()
    steps = []
    for _ in range(new_tokens):
        tok = logits.argmax(-1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        s = time.perf_counter()
        logits, past = m.step(tok[:, None], mask, nxt[:, None], past)
        steps.append(time.perf_counter() - s)
        nxt = nxt + 1
    return t1 - t0, steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    a = ap.parse_args()
    m = OnnxLlm(a.model_dir, threads=a.threads)
    run(m, 1, a.prompt, 4)  # warm up
    name = os.path.basename(a.model_dir.rstrip("/"))
    pre = [run(m, 1, a.prompt, 0)[0] for _ in range(a.repeat * 2)]
    print(f"{name}: prefill {a.prompt} tokens (batch 1): median {statistics.median(pre) * 1e3:.1f} ms, "
          f"best {min(pre) * 1e3:.1f} ms")
    for b in [int(x) for x in a.batches.split(",")]:
        meds, bests = [], []
        for _ in range(a.repeat):
            _, steps = run(m, b, a.prompt, a.new)
            meds.append(b / statistics.median(steps))
            bests.append(b / min(steps))
        print(f"{name}: decode batch {b:2d}: {statistics.median(meds):6.1f} tokens/s (median step), "
              f"{max(bests):6.1f} tokens/s (best step); {a.threads} threads")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
