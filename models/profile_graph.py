#!/usr/bin/env python3
"""Where a decode step spends its time: ONNX Runtime's profiler over greedy decode
steps of a converted decoder (prefill excluded), per operator type.

  python models/profile_graph.py .cache/models/smollm2-135m-instruct-int4 [--batch 1] [--steps 32]

Kernel times are wall times: on a loaded machine every operator's time includes the
preemptions inside it, which inflates the many small operators. To decide whether a graph
change pays, compare CPU time per step of interleaved runs (models/bench_graph.py OLD NEW
--cpu-time).
"""
import argparse
import collections
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm_reference import OnnxLlm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    m = OnnxLlm(a.model_dir, threads=a.threads, spin=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = "/tmp/ferrite_profile"
    m.sess = ort.InferenceSession(os.path.join(a.model_dir, "model.onnx"), so, providers=["CPUExecutionProvider"])
    rng = np.random.RandomState(0)
    rows = [list(rng.randint(100, 40000, size=a.prompt)) for _ in range(a.batch)]
    logits, past, mask, nxt = m.prefill(rows)
    t_start = time.perf_counter()
    for _ in range(a.steps):
        tok = logits.argmax(-1)
        mask = np.concatenate([mask, np.ones((a.batch, 1), np.int64)], axis=1)
        logits, past = m.step(tok[:, None], mask, nxt[:, None], past)
        nxt = nxt + 1
    wall = (time.perf_counter() - t_start) / a.steps
    path = m.sess.end_profiling()
    with open(path) as f:
        ev = json.load(f)
    os.remove(path)
    runs = sorted((e for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    decode = runs[1:]  # the first run is the prefill
    lo = decode[0]["ts"]
    per_op, per_node, total = collections.Counter(), collections.Counter(), 0.0
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= lo:
            op = e["args"]["op_name"]
            per_op[op] += e["dur"]
            per_node[e["name"][: -len("_kernel_time")]] += e["dur"]
            total += e["dur"]
    run_us = sum(r["dur"] for r in decode) / len(decode)
    n = len(decode)
    name = os.path.basename(a.model_dir.rstrip("/"))
    print(f"{name} batch {a.batch}: {n} decode steps after a {a.prompt}-token prompt; wall {wall * 1e3:.2f} ms/step "
          f"(python loop), model_run {run_us / 1e3:.2f} ms, kernels {total / n / 1e3:.2f} ms "
          f"(the rest: ORT's per-run and per-node overhead, thread wakeups)")
    for op, us in per_op.most_common(a.top):
        print(f"  {op:36s} {us / n / 1e3:7.3f} ms/step  {us / total:6.1%}")
    # the matrix products by weight (node names from models/convert_gguf.py: n_<op>_<k>)
    import onnx

    g = onnx.load(os.path.join(a.model_dir, "model.onnx"), load_external_data=False).graph
    weight = {nd.name: nd.input[1] for nd in g.node if nd.op_type in ("MatMulNBits", "MatMul", "FusedMatMul")}
    by_weight = collections.Counter()
    for node, us in per_node.items():
        if node in weight:
            w = weight[node]
            key = w.split(".", 1)[1] if w.startswith("l") and "." in w else w
            by_weight[key] += us
    print("  matrix products by weight (all layers):")
    for w, us in by_weight.most_common(8):
        print(f"    {w:34s} {us / n / 1e3:7.3f} ms/step  {us / total:6.1%}")


if __name__ == "__main__":
    main()
