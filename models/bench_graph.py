#!/usr/bin/env python3
"""Speed of a converted decoder in onnxruntime (Python, CPU): prefill of a 40-token
prompt and greedy decode tokens/s at batch 1 and 16 (64 new tokens after the prompt).

  python models/bench_graph.py .cache/models/smollm2-135m-instruct-int4 [--threads 2]
  python models/bench_graph.py OLD_DIR NEW_DIR ...   # A/B: the models' runs interleaved

Reports the median and the best of --repeat runs (the best is the least disturbed by
other load on a shared machine), and with --cpu-time the CPU time per step.
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
    t0, c0 = time.perf_counter(), time.process_time()
    logits, past, mask, nxt = m.prefill(rows)
    t1, c1 = time.perf_counter(), time.process_time()
    steps, cpu = [], []
    for _ in range(new_tokens):
        tok = logits.argmax(-1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        s, c = time.perf_counter(), time.process_time()
        logits, past = m.step(tok[:, None], mask, nxt[:, None], past)
        steps.append(time.perf_counter() - s)
        cpu.append(time.process_time() - c)
        nxt = nxt + 1
    return t1 - t0, steps, c1 - c0, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dirs", nargs="+", help="several: their runs are interleaved (same load for each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--cpu-time", action="store_true",
                    help="also report process CPU time / threads per step (spinning off): a proxy for "
                         "the speed on an idle machine when other load shares the cores")
    a = ap.parse_args()
    models = [OnnxLlm(d, threads=a.threads, spin=not a.cpu_time) for d in a.model_dirs]
    names = [os.path.basename(d.rstrip("/")) if list(map(os.path.basename, a.model_dirs)).count(os.path.basename(d))
             == 1 else d for d in a.model_dirs]
    for m in models:
        run(m, 1, a.prompt, 4)  # warm up
    pre = {n: [] for n in names}
    for _ in range(a.repeat * 2):
        for n, m in zip(names, models):
            pre[n].append(run(m, 1, a.prompt, 0))
    for n in names:
        wall = [p[0] for p in pre[n]]
        cpu = [p[2] / a.threads for p in pre[n]]
        print(f"{n}: prefill {a.prompt} tokens (batch 1): median {statistics.median(wall) * 1e3:.1f} ms, "
              f"best {min(wall) * 1e3:.1f} ms" + (f"; cpu/threads {min(cpu) * 1e3:.1f} ms" if a.cpu_time else ""))
    for b in [int(x) for x in a.batches.split(",")]:
        res = {n: ([], [], []) for n in names}
        for _ in range(a.repeat):
            for n, m in zip(names, models):
                meds, bests, cpus = res[n]
                _, steps, _, cpu = run(m, b, a.prompt, a.new)
                meds.append(b / statistics.median(steps))
                bests.append(b / min(steps))
                cpus.append(b / (statistics.median(cpu) / a.threads))
        for n in names:
            meds, bests, cpus = res[n]
            print(f"{n}: decode batch {b:2d}: {statistics.median(meds):6.1f} tokens/s (median step), "
                  f"{max(bests):6.1f} tokens/s (best step)"
                  + (f", {statistics.median(cpus):6.1f} tokens/s (cpu time/threads)" if a.cpu_time else "")
                  + f"; {a.threads} threads")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
