#!/usr/bin/env python3
"""Would a shared KV buffer make the decode step faster? (issue 13, item 6; docs/llm.md "Measured")

Times, in one process, rounds alternating between the layouts (the machine is shared), the
decode step of the same weights in three graphs:

  concat   today's graph (convert_gguf.py --attention ops): rows left-padded to the longest,
           `present.*` = Concat(past, new) fed back as the next `past_key_values.*` (moved as
           OrtValues, no copy outside ONNX Runtime: what the Rust engine does);
  gqa      --attention gqa: the same interface, GroupQueryAttention appending into a fresh
           `present.*` (it zeroes the present and copies the past every step);
  shared   --attention gqa-shared: one preallocated buffer [B, kv_heads, max_seq, head_dim] per
           tensor, bound through I/O binding as both `past_key_values.*` and `present.*`, rows
           right-padded, per-row `seqlens_k`; GQA writes the new position in place and copies
           nothing else; the logits go to a preallocated output.

It also times what a join costs (today: the group's cache rebuilt, every row copied to re-pad
it; shared: one row's keys and values written into a free slot), and checks what the shared
graph computes against today's (`--verify`, fp32: max abs logit difference over several steps
of rows of different lengths, each row prefilled alone straight into its slot of the batch
buffer; plus whether several rows that each continue a different cached prefix can be
prefilled in one call).

  python models/bench_kv_layout.py --concat DIR --gqa DIR --shared DIR [--batches 1,4,16] [--contexts 300,500]
  python models/bench_kv_layout.py --verify --concat FP32_OPS_DIR --shared FP32_SHARED_DIR

Model directories: `convert_gguf.py GGUF OUT --quant int4 --attention gqa-shared` (and `gqa`).
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def session(model_dir, threads, profile=False):
    so = ort.SessionOptions()
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = "/tmp/ferrite_kv_layout"
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # as the server runs it (docs/llm.md, "Threads of ONNX Runtime")
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.path.join(model_dir, "model.onnx"), so, providers=["CPUExecutionProvider"])


def config(model_dir):
    with open(os.path.join(model_dir, "llm.json")) as f:
        return json.load(f)


def ov(a):
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))


class Padded:
    """Today's contract (concat and gqa graphs): left-padded rows, mask, past in, present out."""

    def __init__(self, sess, cfg):
        self.sess, self.L, self.kv, self.hd = sess, cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
        self.out_names = [o.name for o in sess.get_outputs()]

    def setup(self, lens, rng):
        """A cache holding rows of `lens` positions (random keys and values, zeros as padding)."""
        b, t = len(lens), int(max(lens))
        self.lens = np.array(lens, np.int64)
        a = rng.standard_normal((b, self.kv, t, self.hd), dtype=np.float32)
        for r, n in enumerate(lens):
            a[r, :, : t - n] = 0
        self.past = [ov(a.copy()) for _ in range(2 * self.L)]
        self.t = t

    def step(self, tokens):
        b = len(self.lens)
        mask = np.zeros((b, self.t + 1), np.int64)
        for r, n in enumerate(self.lens):
            mask[r, self.t - n:] = 1
        feeds = {"input_ids": ov(np.asarray(tokens, np.int64)[:, None]), "attention_mask": ov(mask),
                 "position_ids": ov(self.lens[:, None])}
        for i in range(self.L):
            feeds[f"past_key_values.{i}.key"] = self.past[2 * i]
            feeds[f"past_key_values.{i}.value"] = self.past[2 * i + 1]
        outs = self.sess.run_with_ort_values(self.out_names, feeds)
        self.past = outs[1:]
        self.t += 1
        self.lens = self.lens + 1
        return outs[0].numpy()[:, 0]


class Shared:
    """The gqa-shared contract: one buffer per tensor, bound as past and present, right-padded rows."""

    def __init__(self, sess, cfg, max_seq):
        self.sess, self.L, self.kv, self.hd = sess, cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
        self.vocab, self.max_seq = cfg["vocab_size"], max_seq

    def allocate(self, rows):
        self.bufs = [np.zeros((rows, self.kv, self.max_seq, self.hd), np.float32) for _ in range(2 * self.L)]
        self.lens = np.zeros(rows, np.int64)
        self.logits = np.zeros((rows, 1, self.vocab), np.float32)
        self.io = self.bind(self.bufs, self.logits)

    def bind(self, bufs, logits):
        """An I/O binding with every KV buffer as both input and output (the same memory)."""
        io = self.sess.io_binding()
        for i in range(self.L):
            for j, kv in enumerate(("key", "value")):
                v = ort.OrtValue.ortvalue_from_numpy(bufs[2 * i + j])  # shares the numpy memory
                io.bind_ortvalue_input(f"past_key_values.{i}.{kv}", v)
                io.bind_ortvalue_output(f"present.{i}.{kv}", v)
        io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        return io

    def setup(self, lens, rng):
        self.allocate(len(lens))
        rows = [rng.standard_normal((self.kv, n, self.hd), dtype=np.float32) for n in lens]
        for a in self.bufs:
            for r, n in enumerate(lens):
                a[r, :, :n] = rows[r]
        self.lens = np.array(lens, np.int64)

    def run(self, io, ids, pos, seqlens, total):
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
        io.bind_cpu_input("seqlens_k", np.ascontiguousarray(seqlens, np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        self.sess.run_with_iobinding(io)

    def step(self, tokens):
        if self.lens.max() + 1 > self.max_seq:
            raise SystemExit("max_seq too small")
        self.run(self.io, np.asarray(tokens)[:, None], self.lens[:, None], self.lens, self.lens.max() + 1)
        self.lens = self.lens + 1
        return self.logits[:, 0]

    def prefill_row(self, row, ids, past_len=0):
        """Row `row`'s prompt (after `past_len` positions already in its slot), alone (batch 1),
        straight into its slot of the batch buffers: a join copies nothing."""
        views = [b[row:row + 1] for b in self.bufs]  # contiguous [1, kv, max_seq, hd] views
        logits = np.zeros((1, 1, self.vocab), np.float32)
        io = self.bind(views, logits)
        n = len(ids)
        pos = np.arange(past_len, past_len + n)[None]
        self.run(io, np.asarray(ids)[None], pos, [past_len + n - 1], past_len + n)
        self.lens[row] = past_len + n
        return logits[:, 0]


def rebuild_cost(cfg, lens, rng, repeat):
    """Today's join: the group's left-padded cache rebuilt (zeroed tensors, every row copied to the
    right end, as kv_cache.rs `BatchCache::gather` does) vs the shared buffer's join: one row's
    keys and values written into a free slot. Seconds: (median, least) of `repeat` each."""
    L, kv, hd = cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"]
    b, t = len(lens), int(max(lens))
    base = rng.standard_normal((b, kv, t, hd), dtype=np.float32)
    old = [base.copy() for _ in range(2 * L)]
    new_row = [base[:1].copy() for _ in range(2 * L)]
    buf = [np.ones((b, kv, t + 64, hd), np.float32) for _ in range(2 * L)]  # touched: resident
    rebuild, write = [], []
    for _ in range(repeat):
        s = time.perf_counter()
        for i in range(2 * L):
            dst = np.zeros((b, kv, t, hd), np.float32)
            for r in range(b - 1):  # b - 1 survivors and the new row
                dst[r, :, t - lens[r]:] = old[i][r, :, t - lens[r]:]
            dst[b - 1, :, t - lens[-1]:] = new_row[i][0, :, t - lens[-1]:]
        rebuild.append(time.perf_counter() - s)
        s = time.perf_counter()
        for i in range(2 * L):
            buf[i][b - 1, :, : lens[-1]] = new_row[i][0, :, : lens[-1]]
        write.append(time.perf_counter() - s)
    return (statistics.median(rebuild), min(rebuild)), (statistics.median(write), min(write))


def timed_steps(layout, steps, rng):
    b = len(layout.lens)
    tok = rng.integers(100, 40000, size=b)
    layout.step(tok)  # warm-up (first run at this shape)
    wall, cpu = [], []
    for _ in range(steps):
        s, c = time.perf_counter(), time.process_time()
        layout.step(tok)
        wall.append(time.perf_counter() - s)
        cpu.append(time.process_time() - c)
    return wall, cpu


def bench(a):
    layouts = {}
    for name in ("concat", "gqa", "shared"):
        d = getattr(a, name)
        if d:
            sess, cfg = session(d, a.threads), config(d)
            layouts[name] = Shared(sess, cfg, a.max_seq) if name == "shared" else Padded(sess, cfg)
    cfg = config(next(getattr(a, n) for n in layouts))
    names = list(layouts)
    rng = np.random.default_rng(0)
    rows = []
    print(f"threads {a.threads}, {a.rounds} rounds x {a.steps} steps per layout and shape, "
          f"layouts alternating; shared max_seq {a.max_seq}", flush=True)
    for ctx in [int(x) for x in a.contexts.split(",")]:
        for b in [int(x) for x in a.batches.split(",")]:
            # rows of slightly different lengths (the longest = ctx): some left padding for today's
            # graph, different seqlens for the shared one
            lens = [ctx - (r * 7) % 24 for r in range(b)]
            res = {n: ([], [], []) for n in names}
            for rnd in range(a.rounds):
                order = names[rnd % len(names):] + names[: rnd % len(names)]
                for n in order:
                    layouts[n].setup(lens, rng)
                    wall, cpu = timed_steps(layouts[n], a.steps, rng)
                    res[n][0].extend(wall)
                    res[n][1].extend(cpu)
                    res[n][2].append(statistics.median(wall))
            rebuild, write = rebuild_cost(cfg, lens, rng, 15)
            row = {"context": ctx, "batch": b, "rebuild_ms": [x * 1e3 for x in rebuild],
                   "write_row_ms": [x * 1e3 for x in write]}
            for n in names:
                wall, cpu, meds = res[n]
                q = np.quantile(wall, [0.1, 0.9])
                row[n] = {"median_ms": statistics.median(wall) * 1e3, "p10_ms": q[0] * 1e3, "p90_ms": q[1] * 1e3,
                          "round_medians_ms": [m * 1e3 for m in meds],
                          "cpu_ms": statistics.median(cpu) * 1e3 / a.threads,
                          "cpu_p10_ms": float(np.quantile(cpu, 0.1)) * 1e3 / a.threads}
            rows.append(row)
            base = row[names[0]]["median_ms"]
            for n in names:
                r = row[n]
                print(f"ctx {ctx:4d} batch {b:2d} {n:7s}: step median {r['median_ms']:7.2f} ms "
                      f"(p10-p90 {r['p10_ms']:6.2f}-{r['p90_ms']:6.2f}; round medians "
                      f"{min(r['round_medians_ms']):.1f}-{max(r['round_medians_ms']):.1f}), "
                      f"cpu/threads median {r['cpu_ms']:6.2f} ms p10 {r['cpu_p10_ms']:6.2f} ms, "
                      f"{b / r['median_ms'] * 1e3:6.1f} tok/s, x{base / r['median_ms']:.2f} wall, "
                      f"x{row[names[0]]['cpu_ms'] / r['cpu_ms']:.2f} cpu vs {names[0]}", flush=True)
            print(f"ctx {ctx:4d} batch {b:2d} join (median / least): rebuild of the padded cache "
                  f"{rebuild[0] * 1e3:.2f} / {rebuild[1] * 1e3:.2f} ms, one row into the shared buffer "
                  f"{write[0] * 1e3:.2f} / {write[1] * 1e3:.2f} ms", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def profile(a):
    """ONNX Runtime's profiler over the decode steps of each layout at the first context and the
    last batch: kernel time per operator type (wall times: inflated by other load)."""
    import collections

    ctx, b = int(a.contexts.split(",")[0]), int(a.batches.split(",")[-1])
    lens = [ctx - (r * 7) % 24 for r in range(b)]
    rng = np.random.default_rng(0)
    for name in ("concat", "gqa", "shared"):
        d = getattr(a, name)
        if not d:
            continue
        sess, cfg = session(d, a.threads, profile=True), config(d)
        lay = Shared(sess, cfg, a.max_seq) if name == "shared" else Padded(sess, cfg)
        lay.setup(lens, rng)
        timed_steps(lay, a.steps, rng)
        with open(sess.end_profiling()) as f:
            ev = json.load(f)
        runs = sorted((e for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
        lo = runs[1]["ts"]  # skip the warm-up step
        per_op = collections.Counter()
        for e in ev:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= lo:
                per_op[e["args"]["op_name"]] += e["dur"]
        n = len(runs) - 1
        total = sum(per_op.values())
        print(f"{name}: ctx {ctx} batch {b}: model_run {sum(r['dur'] for r in runs[1:]) / n / 1e3:.2f} ms, kernels "
              f"{total / n / 1e3:.2f} ms per step; " + ", ".join(
                  f"{op} {us / n / 1e3:.2f}" for op, us in per_op.most_common(6)), flush=True)


def verify(a):
    """fp32: the shared graph's logits against today's, rows of different lengths."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from llm_reference import OnnxLlm

    ref = OnnxLlm(a.concat, threads=a.threads)
    cfg = config(a.shared)
    sh = Shared(session(a.shared, a.threads), cfg, a.max_seq)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(100, 40000, size=n)) for n in (37, 20, 9, 64)]
    worst = 0.0

    # 1. each row prefilled alone into its slot, then batched decode steps (per-row lengths)
    sh.allocate(len(prompts))
    got = np.stack([sh.prefill_row(r, p)[0] for r, p in enumerate(prompts)])
    want, past, mask, nxt = ref.prefill(prompts)
    d = float(np.abs(got - want).max())
    print(f"prefill, rows alone into their slots (lengths {[len(p) for p in prompts]}): max |dlogits| {d:.2e}")
    worst = max(worst, d)
    agree = True
    for s in range(a.verify_steps):
        tok = want.argmax(-1)
        got = sh.step(tok).copy()
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        want, past = ref.step(tok[:, None], mask, nxt[:, None], past)
        nxt = nxt + 1
        d = float(np.abs(got - want).max())
        agree &= bool((got.argmax(-1) == want.argmax(-1)).all())
        worst = max(worst, d)
        print(f"decode step {s + 1}: max |dlogits| {d:.2e}, greedy tokens equal: {agree}")

    # 2. right-padded rows prefilled together (a first prompt: every row starts at 0)
    sh.allocate(len(prompts))
    n = max(map(len, prompts))
    ids, pos = np.full((len(prompts), n), cfg["pad_token_id"]), np.zeros((len(prompts), n), np.int64)
    for r, p in enumerate(prompts):
        ids[r, : len(p)], pos[r, : len(p)] = p, np.arange(len(p))
    sh.run(sh.io, ids, pos, [len(p) - 1 for p in prompts], n)
    sh.lens = np.array([len(p) for p in prompts])
    want, _, _, _ = ref.prefill(prompts)
    d = float(np.abs(sh.logits[:, 0] - want).max())
    worst = max(worst, d)
    print(f"prefill, right-padded rows in one call: max |dlogits| {d:.2e}")

    # 3. prefix hits: one row continuing its cached prefix (a chunk after a past) - batch 1
    ext = list(rng.integers(100, 40000, size=12))
    got = sh.prefill_row(0, ext, past_len=len(prompts[0]))
    want, _, _, _ = ref.prefill([prompts[0] + ext])
    d = float(np.abs(got - want).max())
    worst = max(worst, d)
    print(f"prefill of 12 tokens after a 37-token cached prefix (batch 1): max |dlogits| {d:.2e}")

    # 4. several rows each continuing a different cached prefix, one call
    lens = sh.lens.copy()
    k = 4
    pos = lens[:, None] + np.arange(k)[None]
    try:
        sh.run(sh.io, rng.integers(100, 40000, size=(len(prompts), k)), pos, lens + k - 1, int(lens.max()) + k)
        print(f"prefill of {k} tokens on each of {len(prompts)} rows after different cached prefixes: accepted")
    except Exception as e:  # noqa: BLE001 - report what ONNX Runtime says
        print(f"prefill of {k} tokens on each of {len(prompts)} rows after different cached prefixes: REFUSED "
              f"by ONNX Runtime {ort.__version__}: {str(e).splitlines()[0][:240]}")
    print(f"worst max |dlogits| {worst:.2e}")
    if worst > a.atol or not agree:
        raise SystemExit(f"shared-buffer graph differs from today's graph (atol {a.atol})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concat", help="model dir, --attention ops (today's graph)")
    ap.add_argument("--gqa", help="model dir, --attention gqa")
    ap.add_argument("--shared", help="model dir, --attention gqa-shared")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--contexts", default="300,500")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per layout, shape and round")
    ap.add_argument("--max-seq", type=int, default=768,
                    help="positions of the shared buffer (a group's reach: prompt + max_tokens)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--verify", action="store_true", help="check the shared graph against --concat (fp32)")
    ap.add_argument("--verify-steps", type=int, default=6)
    ap.add_argument("--profile", action="store_true",
                    help="kernel time per operator type of each layout (first context, last batch)")
    ap.add_argument("--atol", type=float, default=1e-3)
    a = ap.parse_args()
    if a.verify:
        if not (a.concat and a.shared):
            ap.error("--verify needs --concat and --shared")
        verify(a)
    elif a.profile:
        profile(a)
    else:
        if not (a.concat or a.gqa or a.shared):
            ap.error("give at least one model directory")
        bench(a)


if __name__ == "__main__":
    main()
