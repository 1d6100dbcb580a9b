#!/usr/bin/env python3
"""Convert a llama-architecture GGUF file into a ferrite LLM model directory.

Writes (see docs/llm.md): model.onnx (decoder with a KV cache), tokenizer.json,
chat_template.jinja and llm.json. Uses only `gguf`, `numpy` and `onnx`.

  python models/convert_gguf.py GGUF OUTDIR --quant none|int4

The graph is built by hand from the GGUF tensors:

- token embedding: Gather on the dequantized `token_embd.weight`;
- per layer: RMSNorm (com.microsoft SkipSimplifiedLayerNormalization, which also adds
  the residual), one fused QKV projection, rotary embeddings (com.microsoft
  RotaryEmbedding, per-row `position_ids`), grouped-query attention with standard ops
  (the 3 query heads of each KV head are stacked along the row axis, so K and V are
  never repeated), an additive mask built once from `attention_mask` and the causal
  rule, output projection, SwiGLU MLP with a fused gate/up projection. `--attention gqa`
  makes the attention one com.microsoft GroupQueryAttention node instead (every row
  declared full length, `seqlens_k = T - 1`, so GQA appends at T like Concat and the
  same bias hides the left padding); not faster on the CPUs measured (docs/llm.md);
  `--attention gqa-shared` is GroupQueryAttention over one preallocated KV buffer per
  tensor `[batch, kv_heads, max_seq, head_dim]` that the caller binds as both
  `past_key_values.*` and `present.*` (ONNX Runtime then writes only the new positions),
  rows right-padded, `seqlens_k` / `total_sequence_length` instead of `attention_mask`,
  the logits of each row's last real token (models/bench_kv_layout.py measures it);
- the final RMSNorm and the LM head (tied to the embedding when the GGUF has no
  `output.weight`) run on the last position only.

GGUF's Q and K weights are stored permuted (llama.cpp's converter reorders each head's
rows so that its "normal" RoPE rotates adjacent pairs); we undo the permutation, so the
graph uses Hugging Face's rotate-half RoPE and its KV cache matches Hugging Face's.

Quantization:
- `none`: every weight dequantized to float32.
- `int4`: the projections become 4-bit MatMulNBits (block 64, asymmetric
  round-to-nearest with uint8 zero points and a least-squares scale per block, from the
  dequantized GGUF weights: see rtn_nbits), the LM head an 8-bit MatMulNBits taken
  exactly from the Q8_0 embedding blocks (block 32). accuracy_level 4 (int8
  activations) selects MLAS's fastest CPU kernels (accuracy_level 1 was ~10x slower
  at batch 1 in ONNX Runtime 1.31). Block 64 rather than 32: 4.6 instead of 5.1 bits
  per weight (fp32 scale + 4-bit zero point per block), so ~10% fewer bytes read per
  token in the memory-bound batch-1 decode (measured 70-79 vs 70 tokens/s CPU-time
  equivalent on a loaded machine: within its noise), with agreement with transformers
  and llama.cpp within a few points of block 32 (128 does not divide 576).
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

T0 = time.time()


def log(msg):
    print(f"[convert {time.time() - T0:6.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- GGUF
class Gguf:
    def __init__(self, path):
        self.path = path
        self.r = GGUFReader(path)
        self.t = {t.name: t for t in self.r.tensors}

    def field(self, key, default=None):
        f = self.r.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def has(self, name):
        return name in self.t

    def qtype(self, name):
        return self.t[name].tensor_type

    def f32(self, name):
        """Dequantized tensor as [rows(out), cols(in)] float32 (numpy order)."""
        t = self.t[name]
        a = dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(a, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))

    def raw(self, name):
        t = self.t[name]
        return np.asarray(t.data)


def unpermute_rows(w, n_head):
    """Undo llama.cpp's Q/K row permutation (works on float rows or raw block rows)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- 4-bit
def q8_0_to_nbits(raw):
    """GGUF Q8_0 rows [N, nb*34 bytes] -> 8-bit MatMulNBits (B uint8 [N, nb, 32], scales; zp 128 default)."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 34)
    d = blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32)[:, :, 0]
    q = blocks[:, :, 2:34].view(np.int8).astype(np.int16) + 128
    return q.astype(np.uint8), d.reshape(-1).astype(np.float32)


def rtn_nbits(w, bits=4, block=32):
    """float [N, K] -> asymmetric round-to-nearest MatMulNBits blocks with uint8 zero points.

    Why not map the GGUF's Q4_1 blocks (w = d*q + m) one to one: MatMulNBits computes
    scale * (q - zp), so m becomes a float zero point -m/d, and ONNX Runtime 1.31's CPU
    kernel has no fast path for float zero points (it dequantizes the whole weight on
    every call: ~20x slower than with uint8 zero points). Re-rounding the zero point
    to an integer costs at most half a step per block, the usual 4-bit RTN error.
    """
    n, k = w.shape
    assert k % block == 0
    nb = k // block
    b = w.reshape(n, nb, block)
    lo, hi = np.minimum(b.min(axis=2), 0.0), np.maximum(b.max(axis=2), 0.0)
    levels = (1 << bits) - 1
    # the scale of each block: the candidate (a fraction of the min-max step) with the
    # least squared error; ~15% lower weight error than plain min-max for 4 bits
    best_err = scale = zp = None
    for f in (np.linspace(0.80, 1.10, 7) if bits == 4 else (1.0,)):
        s = (hi - lo) / levels * f
        s = np.where(s == 0, 1.0, s).astype(np.float32)
        z = np.clip(np.round(-lo / s), 0, levels)
        q = np.clip(np.round(b / s[:, :, None]) + z[:, :, None], 0, levels)
        err = (((q - z[:, :, None]) * s[:, :, None] - b) ** 2).sum(axis=2)
        if best_err is None:
            best_err, scale, zp = err, s, z
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            scale, zp = np.where(better, s, scale), np.where(better, z, zp)
    zp = zp.astype(np.uint8)
    q = np.clip(np.round(b / scale[:, :, None]) + zp[:, :, None], 0, levels).astype(np.uint8)
    if bits == 4:
        q = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
        if nb % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    return q, scale.reshape(-1), zp.reshape(-1)


# --------------------------------------------------------------------------- graph
class G:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def init(self, name, arr):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, hint, arr):
        return self.init(self.name(hint), np.asarray(arr))

    def branch(self, hint, body, n_out):
        """A subgraph (an If branch) of the nodes that body() adds; body returns its n_out outputs."""
        outer, self.nodes = self.nodes, []
        outs = body()
        nodes, self.nodes = self.nodes, outer
        infos = [helper.make_empty_tensor_value_info(o) for o in outs]
        return helper.make_graph(nodes, self.name(hint), [], infos)

    def op(self, op, inputs, hint=None, n_out=1, domain=None, outputs=None, **attrs):
        outs = outputs or [self.name(hint or op) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name("n_" + op), domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]


def attention_bias(g, seq, total, past, group, window=None):
    """The additive attention bias [b, 1, s, T] from `attention_mask` and the causal rule, and
    the same tiled for the query heads of a KV head stacked as rows [b, 1, group * s, T].
    With `window`, also the sliding-window pair (a query sees the `window` latest positions,
    itself included; rows are left-padded, so cache columns differ as positions do)."""
    i64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    zero_s, one_s = g.const("c", i64(0)), g.const("c", i64(1))
    seq_s = g.op("Squeeze", [seq], "seq_s")
    total_s = g.op("Squeeze", [total], "total_s")
    past_s = g.op("Squeeze", [past], "past_s")
    kidx = g.op("Range", [zero_s, total_s, one_s], "kidx")  # [T]
    qidx = g.op("Range", [past_s, total_s, one_s], "qidx")  # [s] absolute positions
    qcol = g.op("Unsqueeze", [qidx, g.const("c", i64([1]))], "qcol")  # [s,1]
    causal = g.op("LessOrEqual", [kidx, qcol], "causal")  # [s,T]
    am_bool = g.op("Cast", ["attention_mask"], "am_bool", to=TensorProto.BOOL)
    am4 = g.op("Unsqueeze", [am_bool, g.const("c", i64([1, 2]))], "am4")  # [b,1,1,T]
    allowed = g.op("And", [am4, causal], "allowed")  # [b,1,s,T]

    def biases(allowed, hint):
        bias = g.op("Where", [allowed, g.const("c", np.array(0.0, np.float32)),
                              g.const("c", np.array(-1e9, np.float32))], hint)
        return bias, g.op("Tile", [bias, g.const("c", i64([1, 1, group, 1]))], hint + "_g")  # rows g*s+t

    if window is None:
        return biases(allowed, "bias")
    near = g.op("Less", [g.op("Sub", [qcol, kidx], "dist"), g.const("c", i64(window))], "near")  # [s,T]
    return biases(allowed, "bias") + biases(g.op("And", [allowed, near], "allowed_swa"), "bias_swa")


# Architectures this converter reads (GGUF `general.architecture`); Mistral and Llama 3
# GGUFs are `llama` (llama.cpp's converter writes them so).
ARCHITECTURES = ("llama", "qwen2", "phi3", "gemma2")


def arch_config(gg: Gguf):
    """The decoder's shape and per-family rules, from the GGUF metadata and tensor names."""
    arch = gg.field("general.architecture")
    if arch not in ARCHITECTURES:
        sys.exit(f"unsupported architecture {arch!r} (this converter reads {', '.join(ARCHITECTURES)})")

    def key(name, default=None):
        return gg.field(f"{arch}.{name}", default)

    c = dict(arch=arch)
    c["L"] = int(key("block_count"))
    c["hidden"] = int(key("embedding_length"))
    c["n_head"] = int(key("attention.head_count"))
    c["n_kv"] = int(key("attention.head_count_kv", c["n_head"]))
    c["eps"] = float(key("attention.layer_norm_rms_epsilon"))
    c["theta"] = float(key("rope.freq_base", 10000.0))
    c["ctx"] = int(key("context_length"))
    # head_dim: attention.key_length where it is not hidden / heads (Gemma 2)
    c["hd"] = hd = int(key("attention.key_length", c["hidden"] // c["n_head"]))
    if int(key("attention.value_length", hd)) != hd:
        sys.exit("attention.value_length != key_length is not supported")
    rot_dim = int(key("rope.dimension_count", hd))
    if rot_dim != hd:
        sys.exit(f"partial rotary embeddings (rope.dimension_count {rot_dim} < head_dim {hd}) are not supported")
    # rotary frequencies (Hugging Face rotate-half convention), with the scalings GGUF carries
    inv = 1.0 / (c["theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = key("rope.scaling.type")
    if scaling == "linear":
        inv = inv / float(key("rope.scaling.factor"))
    elif scaling not in (None, "none"):
        sys.exit(f"rope scaling {scaling!r} is not supported (none, linear, llama3 via rope_freqs)")
    if gg.has("rope_freqs.weight"):
        # Llama 3.1's rope scaling: llama.cpp stores each frequency's divisor
        inv = inv / gg.f32("rope_freqs.weight").reshape(-1).astype(np.float64)
    if gg.has("rope_factors_long.weight") or gg.has("rope_factors_short.weight"):
        sys.exit("Phi-3 LongRoPE (rope_factors_long/short) is not supported: use a 4k-context Phi-3")
    c["inv_freq"] = inv
    # llama.cpp permutes Q/K rows only for the llama architecture (its rotary rotates pairs)
    c["permuted"] = arch == "llama"
    c["gemma"] = arch == "gemma2"
    c["fused_qkv"] = gg.has("blk.0.attn_qkv.weight")
    c["fused_gate_up"] = not gg.has("blk.0.ffn_gate.weight")
    c["qkv_bias"] = gg.has("blk.0.attn_q.bias")
    c["post_norms"] = gg.has("blk.0.post_attention_norm.weight")
    c["act"] = "gelu_tanh" if c["gemma"] else "silu"
    c["emb_scale"] = float(np.float32(np.sqrt(c["hidden"]))) if c["gemma"] else None
    # Gemma 2's query scale is query_pre_attn_scalar ** -0.5, which GGUF does not carry:
    # head_dim, except the 27B model (46 layers) whose scalar is hidden / heads (as llama.cpp)
    scalar = c["hidden"] // c["n_head"] if (c["gemma"] and c["L"] == 46) else hd
    c["attn_scale"] = 1.0 / np.sqrt(scalar)
    c["attn_softcap"] = float(key("attn_logit_softcapping", 0.0) or 0.0) or None
    c["final_softcap"] = float(key("final_logit_softcapping", 0.0) or 0.0) or None
    window = key("attention.sliding_window")
    window = int(window) if window else None
    if window and arch == "gemma2":
        c["swa_layers"] = {i for i in range(c["L"]) if i % 2 == 0}  # local, global, local, ...
    elif window and arch == "phi3":
        c["swa_layers"] = set(range(c["L"]))  # as transformers' Phi-3: every layer
    else:
        window, c["swa_layers"] = None, set()
    c["window"] = window
    return c


def build(gg: Gguf, quant: str, block_size: int = 64, accuracy_level: int = 4, attention: str = "ops"):
    c = arch_config(gg)
    arch, L, hidden, n_head, n_kv, eps, ctx, hd = (c[k] for k in ("arch", "L", "hidden", "n_head", "n_kv", "eps",
                                                                  "ctx", "hd"))
    if attention != "ops" and (c["attn_softcap"] or c["window"]):
        sys.exit(f"--attention {attention} does not support soft-capping or sliding windows (use ops)")
    q_dim = n_head * hd
    group = n_head // n_kv
    emb = gg.f32("token_embd.weight")  # [V, hidden]
    vocab = emb.shape[0]
    tied = not gg.has("output.weight")
    log(f"{arch}: {L} layers, hidden {hidden}, heads {n_head}/{n_kv}, head_dim {hd}, vocab {vocab}, "
        f"rope theta {c['theta']:g}, eps {eps:g}, tied embeddings: {tied}, qkv bias: {c['qkv_bias']}, "
        f"sliding window: {c['window']} on {len(c['swa_layers'])} layers, soft-caps: {c['attn_softcap']}/"
        f"{c['final_softcap']}, quant {quant}")

    g = G()
    g.init("embed.weight", emb)

    def linear(x, names, hint, n_heads_unpermute=None, biases=None):
        """x @ concat(names).T (+ concat(biases)); names: GGUF weight names ([out, in] each)."""
        y = linear_nobias(x, names, hint, n_heads_unpermute)
        if not biases:
            return y
        return g.op("Add", [y, g.init(hint + ".bias", np.concatenate([gg.f32(b).reshape(-1) for b in biases]))],
                    hint + "_b")

    def linear_nobias(x, names, hint, n_heads_unpermute):
        ws = []
        for nm in names:
            w = gg.f32(nm)
            if nm in n_heads_unpermute:
                w = unpermute_rows(w, n_heads_unpermute[nm])
            ws.append(w)
        w = np.concatenate(ws, axis=0)
        if quant == "none":
            wname = g.init(hint + ".weight", np.ascontiguousarray(w.T))
            return g.op("MatMul", [x, wname], hint)
        # int4: re-quantize the dequantized weights (see rtn_nbits for why not the raw Q4_1 blocks)
        k = w.shape[1]
        if k % block_size:
            sys.exit(f"--block-size {block_size} does not divide {names[0]}'s input size {k}: use a smaller one")
        b, s, z = rtn_nbits(w, 4, block_size)
        n = b.shape[0]
        return g.op("MatMulNBits", [x, g.init(hint + ".qweight", b), g.init(hint + ".scales", s),
                                    g.init(hint + ".zp", z)], hint, domain="com.microsoft",
                    K=k, N=n, bits=4, block_size=block_size, accuracy_level=accuracy_level)

    shared = attention == "gqa-shared"
    # ---- inputs
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    if shared:
        # per-row lengths instead of a mask: seqlens_k[b] = row b's past + new tokens - 1 (rows
        # right-padded in the buffer), total_sequence_length = the longest row's past + new
        inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
                   helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    else:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                    ["batch_size", "total_sequence_length"]))
    inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, vocab])]
    past_len, present_len = ("max_sequence_length",) * 2 if shared else ("past_sequence_length",
                                                                          "total_sequence_length")
    for i in range(L):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", TensorProto.FLOAT,
                                                        ["batch_size", n_kv, past_len, hd]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", TensorProto.FLOAT,
                                                         ["batch_size", n_kv, present_len, hd]))

    i64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    # ---- shapes
    ids_shape = g.op("Shape", ["input_ids"], "ids_shape")
    batch = g.op("Slice", [ids_shape, g.const("c", i64([0])), g.const("c", i64([1]))], "batch")
    seq = g.op("Slice", [ids_shape, g.const("c", i64([1])), g.const("c", i64([2]))], "seq")

    # ---- additive attention bias [b, 1, s, T] (padding and causal rule), shared by every layer
    # (gqa-shared: none; GQA reads row b's first seqlens_k[b] + 1 positions, causal by itself)
    if not shared:
        total = g.op("Shape", ["attention_mask"], "total", start=1, end=2)
        past = g.op("Sub", [total, seq], "past")
        bias, bias_g, *swa_bias = attention_bias(g, seq, total, past, group, c["window"])
    if attention == "gqa":
        # GroupQueryAttention: every row counts as full length (seqlens_k = T - 1), so it
        # appends the new keys at T like Concat does; `bias` hides the left padding.
        total_i32 = g.op("Cast", [g.op("Squeeze", [total], "total_s")], "total_i32", to=TensorProto.INT32)
        seqlens = g.op("Cast", [g.op("Expand", [g.op("Sub", [total, g.const("c", i64([1]))], "tm1"), batch],
                                     "seqlens64")], "seqlens_k", to=TensorProto.INT32)
        # ONNX Runtime's CPU kernel refuses several rows that each add several tokens to a
        # past (a batched chunked prefill): those calls take the standard-ops attention.
        several = lambda t: g.op("Greater", [t, g.const("c", i64([1]))], "gt1")  # noqa: E731
        batched_chunk = g.op("And", [g.op("And", [several(batch), several(seq)], "and"),
                                     g.op("Greater", [past, g.const("c", i64([0]))], "has_past")], "batched_chunk")
        batched_chunk = g.op("Squeeze", [batched_chunk], "batched_chunk_s")

    # rotary caches (HF rotate-half convention)
    ang = np.outer(np.arange(ctx, dtype=np.float64), c["inv_freq"])
    cos = g.init("rope.cos", np.cos(ang).astype(np.float32))
    sin = g.init("rope.sin", np.sin(ang).astype(np.float32))

    # shape constants
    shp_q5 = g.op("Concat", [batch, seq, g.const("c", i64([n_kv, group, hd]))], "shp_q5", axis=0)
    shp_q4 = g.op("Concat", [batch, g.const("c", i64([n_kv, -1, hd]))], "shp_q4", axis=0)
    shp_kv = g.op("Concat", [batch, seq, g.const("c", i64([n_kv, hd]))], "shp_kv", axis=0)
    shp_o5 = g.op("Concat", [batch, g.const("c", i64([n_kv, group])), seq, g.const("c", i64([hd]))], "shp_o5", axis=0)
    shp_o3 = g.op("Concat", [batch, seq, g.const("c", i64([q_dim]))], "shp_o3", axis=0)
    split_qkv = g.const("c", i64([q_dim, n_kv * hd, n_kv * hd]))
    ffn = gg.t["blk.0.ffn_down.weight"].shape[0]  # GGUF shape [in, out]: in = ffn
    split_ffn = g.const("c", i64([int(ffn), int(ffn)]))

    def attention_ops(i, q, k, v, presents=None):
        """Grouped-query attention from standard ops; returns the output [b, s, hidden] and
        the presents (named `presents`, else fresh names)."""
        k = g.op("Transpose", [g.op("Reshape", [k, shp_kv], "k4")], "kT", perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [v, shp_kv], "v4")], "vT", perm=[0, 2, 1, 3])
        pk = g.op("Concat", [f"past_key_values.{i}.key", k], "pk", axis=2, outputs=presents and presents[:1])
        pv = g.op("Concat", [f"past_key_values.{i}.value", v], "pv", axis=2, outputs=presents and presents[1:])
        q = g.op("Reshape", [q, shp_q5], "q5")  # [b,s,kv,g,hd]
        q = g.op("Transpose", [q], "q5t", perm=[0, 2, 3, 1, 4])  # [b,kv,g,s,hd]
        q = g.op("Reshape", [q, shp_q4], "q4")  # [b,kv,g*s,hd]
        sc = g.op("FusedMatMul", [q, pk], "scores", domain="com.microsoft", transA=0, transB=1,
                  alpha=float(c["attn_scale"]))
        if c["attn_softcap"]:  # Gemma 2: cap * tanh(scores / cap)
            cap = g.const("c", np.array(c["attn_softcap"], np.float32))
            sc = g.op("Mul", [g.op("Tanh", [g.op("Div", [sc, cap], "sc_d")], "sc_t"), cap], "scores_c")
        sc = g.op("Add", [sc, swa_bias[1] if i in c["swa_layers"] else bias_g], "scores_m")
        pr = g.op("Softmax", [sc], "probs", axis=-1)
        o = g.op("MatMul", [pr, pv], "ctx")  # [b,kv,g*s,hd]
        o = g.op("Reshape", [o, shp_o5], "ctx5")
        o = g.op("Transpose", [o], "ctx5t", perm=[0, 3, 1, 2, 4])  # [b,s,kv,g,hd]
        o = g.op("Reshape", [o, shp_o3], "ctx3")
        return o, pk, pv

    h = g.op("Gather", ["embed.weight", "input_ids"], "h")
    if c["emb_scale"]:  # Gemma: embeddings times sqrt(hidden) (the tied LM head is not scaled)
        h = g.op("Mul", [h, g.const("c", np.array(c["emb_scale"], np.float32))], "h_scaled")
    resid = None
    x = None
    log("building layers")
    for i in range(L):
        p = f"blk.{i}."
        g.init(f"l{i}.attn_norm", gg.f32(p + "attn_norm.weight"))
        g.init(f"l{i}.ffn_norm", gg.f32(p + "ffn_norm.weight"))
        if i == 0:
            x = g.op("SimplifiedLayerNormalization", [h, f"l{i}.attn_norm"], "x", epsilon=eps, axis=-1,
                     stash_type=1)
            resid = h
        else:
            x, _, _, resid = g.op("SkipSimplifiedLayerNormalization", [x_attn_in, resid, f"l{i}.attn_norm"],
                                  "x", n_out=4, domain="com.microsoft", epsilon=eps)
        if c["fused_qkv"]:  # Phi-3: one [q; k; v] projection
            qkv = linear(x, [p + "attn_qkv.weight"], f"l{i}.qkv", {})
        else:
            unpermute = {p + "attn_q.weight": n_head, p + "attn_k.weight": n_kv} if c["permuted"] else {}
            qkv = linear(x, [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"], f"l{i}.qkv",
                         unpermute, [p + f"attn_{n}.bias" for n in "qkv"] if c["qkv_bias"] else None)
        q, k, v = g.op("Split", [qkv, split_qkv], "qkv_s", n_out=3, axis=-1)
        q = g.op("RotaryEmbedding", [q, "position_ids", cos, sin], "q_rot", domain="com.microsoft",
                 num_heads=n_head, interleaved=0)
        k = g.op("RotaryEmbedding", [k, "position_ids", cos, sin], "k_rot", domain="com.microsoft",
                 num_heads=n_kv, interleaved=0)
        presents = [f"present.{i}.key", f"present.{i}.value"]
        if shared:
            # bound to the same buffers as past_key_values.* (I/O binding), GQA writes the new
            # keys and values in place at each row's seqlens_k - s + 1 and copies nothing else
            o = g.op("GroupQueryAttention", [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                             "seqlens_k", "total_sequence_length"],
                     outputs=[g.name("ctx3")] + presents, n_out=3, domain="com.microsoft",
                     num_heads=n_head, kv_num_heads=n_kv, scale=float(c["attn_scale"]))[0]
        elif attention == "gqa":
            # one fused op: appends k, v to the past (BNSH, as present.*), grouped-query
            # attention with `bias` (per-row padding) and its own causal rule, output [b, s, hidden]
            gqa = g.branch("gqa", lambda: g.op(
                "GroupQueryAttention", [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                                        total_i32, "", "", "", bias], "gqa", n_out=3, domain="com.microsoft",
                num_heads=n_head, kv_num_heads=n_kv, scale=float(c["attn_scale"])), 3)
            ops = g.branch("attn_ops", lambda: attention_ops(i, q, k, v), 3)
            o = g.op("If", [batched_chunk], outputs=[g.name("ctx3")] + presents, n_out=3,
                     then_branch=ops, else_branch=gqa)[0]
        else:
            o, _, _ = attention_ops(i, q, k, v, presents)
        attn = linear(o, [p + "attn_output.weight"], f"l{i}.o", {})
        if c["post_norms"]:  # Gemma 2: the attention output is normalized before the residual add
            attn = g.op("SimplifiedLayerNormalization", [attn, g.init(f"l{i}.post_attn_norm",
                        gg.f32(p + "post_attention_norm.weight"))], "attn_n", epsilon=eps, axis=-1, stash_type=1)
        x, _, _, resid = g.op("SkipSimplifiedLayerNormalization", [attn, resid, f"l{i}.ffn_norm"],
                              "x", n_out=4, domain="com.microsoft", epsilon=eps)
        # Phi-3's ffn_up is already the fused [gate; up]
        gu = linear(x, [p + "ffn_up.weight"] if c["fused_gate_up"] else [p + "ffn_gate.weight", p + "ffn_up.weight"],
                    f"l{i}.gate_up", {})
        gate, up = g.op("Split", [gu, split_ffn], "gu_s", n_out=2, axis=-1)
        if c["act"] == "gelu_tanh":  # GeGLU (Gemma): FastGelu is the tanh approximation
            act = g.op("FastGelu", [gate], "gelu", domain="com.microsoft")
        else:  # SwiGLU
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate], "sig")], "silu")
        x_attn_in = linear(g.op("Mul", [act, up], "glu"), [p + "ffn_down.weight"], f"l{i}.down", {})
        if c["post_norms"]:
            x_attn_in = g.op("SimplifiedLayerNormalization", [x_attn_in, g.init(
                f"l{i}.post_ffw_norm", gg.f32(p + "post_ffw_norm.weight"))], "ffn_n", epsilon=eps, axis=-1,
                stash_type=1)
        if (i + 1) % 10 == 0 or i == L - 1:
            log(f"layer {i + 1}/{L}")

    # last position only
    if shared:
        # each row's last real token: min(s - 1, seqlens_k), which is s - 1 for a decode step or
        # a chunk after a past, and len_b - 1 for a first prefill of right-padded rows
        last = g.op("Min", [g.op("Sub", [seq, g.const("c", i64([1]))], "sm1"),
                            g.op("Cast", ["seqlens_k"], "seqlens64", to=TensorProto.INT64)], "last")
        idx = g.op("Expand", [g.op("Unsqueeze", [last, g.const("c", i64([1, 2]))], "last3"),
                              g.op("Concat", [batch, g.const("c", i64([1, hidden]))], "shp_last", axis=0)], "idx")
        last_x = g.op("GatherElements", [x_attn_in, idx], "last_x", axis=1)
        last_r = g.op("GatherElements", [resid, idx], "last_r", axis=1)
    else:
        m1, big = g.const("c", i64([-1])), g.const("c", i64([np.iinfo(np.int64).max]))
        ax1 = g.const("c", i64([1]))
        last_x = g.op("Slice", [x_attn_in, m1, big, ax1], "last_x")
        last_r = g.op("Slice", [resid, m1, big, ax1], "last_r")
    g.init("output_norm", gg.f32("output_norm.weight"))
    xn, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [last_x, last_r, "output_norm"], "xf", n_out=4,
                       domain="com.microsoft", epsilon=eps)
    head_name = "token_embd.weight" if tied else "output.weight"
    logits = g.name("logits_raw") if c["final_softcap"] else "logits"
    if quant == "none":
        w = emb if tied else gg.f32(head_name)
        wn = "embed.weight" if tied else g.init("lm_head.weight", w)
        g.op("FusedMatMul", [xn, wn], outputs=[logits], domain="com.microsoft", transA=0, transB=1)
    else:
        qt = gg.qtype(head_name)
        if qt == QT.Q8_0:
            b, s = q8_0_to_nbits(gg.raw(head_name))
            ins = [xn, g.init("lm_head.qweight", b), g.init("lm_head.scales", s)]
            bits, k = 8, b.shape[1] * 32
        else:
            b, s, z = rtn_nbits(emb if tied else gg.f32(head_name), 8, 32)
            ins = [xn, g.init("lm_head.qweight", b), g.init("lm_head.scales", s), g.init("lm_head.zp", z)]
            bits, k = 8, b.shape[1] * 32
        g.op("MatMulNBits", ins, outputs=[logits], domain="com.microsoft", K=k, N=b.shape[0], bits=bits,
             block_size=32, accuracy_level=accuracy_level)
    if c["final_softcap"]:  # Gemma 2: cap * tanh(logits / cap)
        cap = g.const("c", np.array(c["final_softcap"], np.float32))
        g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap], "lg_d")], "lg_t"), cap], outputs=["logits"])

    graph = helper.make_graph(g.nodes, f"ferrite_{arch}_decoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="ferrite models/convert_gguf.py")
    model.ir_version = 8
    meta = dict(L=L, n_kv=n_kv, hd=hd, vocab=vocab, ctx=ctx, arch=arch)
    return model, meta


# --------------------------------------------------------------------------- tokenizer
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` names (the ones we know).
GPT2_PAT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


# llama.cpp's `llama-bpe` (Llama 3) and `qwen2` pre-tokenizers: GPT-4-style splits, digits in
# runs of up to three (Llama 3) or one by one (Qwen2).
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = LLAMA3_PAT.replace(r"\p{N}{1,3}", r"\p{N}")


def pre_tokenizer_for(pre):
    if pre in ("llama-bpe", "llama3", "qwen2"):
        pat = QWEN2_PAT if pre == "qwen2" else LLAMA3_PAT
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pat}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    if pre in ("smollm", "gpt2", "starcoder", "refact", "codeshell", "default", None):
        # SmolLM/StarCoder: digits split one by one, then GPT-2's byte-level split.
        seq = []
        if pre in ("smollm", "starcoder", "refact", "codeshell"):
            seq.append({"type": "Digits", "individual_digits": True})
        seq.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True})
        return {"type": "Sequence", "pretokenizers": seq}
    sys.exit(f"unsupported tokenizer.ggml.pre {pre!r}")


SPM = "\u2581"  # SentencePiece's word-boundary mark


def spm_merges(tokens, scores):
    """BPE merges recovered from a SentencePiece vocabulary (GGUF stores scores, not merges):
    every split of a token into two tokens, ranked by the token's score, as transformers'
    `generate_merges` does (so both build the same tokenizer from the same GGUF)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merge, score in dict(zip(tokens, scores)).items():
        local = [(merge[:k], merge[k:], score) for k in range(1, len(merge))
                 if merge[:k] in vocab and merge[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[a, b] for a, b, _ in merges]


def spm_tokenizer(gg: Gguf, arch):
    """A SentencePiece (`tokenizer.ggml.model` llama) vocabulary as a BPE tokenizer with byte
    fallback, shaped per family as transformers shapes it: Llama/Mistral put the boundary mark
    before the first word (Metaspace), Phi-3 before the text by a normalizer, Gemma never
    (and its vocabulary spells runs of spaces as spaces, its merges follow the vocabulary's
    order rather than the scores)."""
    tokens = list(gg.field("tokenizer.ggml.tokens"))
    if arch == "gemma2":
        tokens = [SPM * len(t) if " " in t and not t.strip() else t for t in tokens]
        merges = spm_merges(tokens, [-i for i in range(len(tokens))])
    else:
        scores = gg.field("tokenizer.ggml.scores")
        if scores is None:
            sys.exit("a SentencePiece vocabulary without tokenizer.ggml.scores")
        merges = spm_merges(tokens, [float(x) for x in scores])
    decoder = [{"type": "Replace", "pattern": {"String": SPM}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}]
    to_spm = {"type": "Replace", "pattern": {"String": " "}, "content": SPM}
    if arch == "gemma2":
        normalizer = to_spm
        pre = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
    elif arch == "phi3":
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPM}, to_spm]}
        pre = None
    else:
        normalizer = None
        pre = {"type": "Metaspace", "replacement": SPM, "prepend_scheme": "first", "split": False}
    if arch != "gemma2":
        decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk = "<unk>" if arch == "gemma2" and "<unk>" in tokens else None
    model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
             "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}
    return tokens, {"normalizer": normalizer, "pre_tokenizer": pre, "post_processor": None,
                    "decoder": {"type": "Sequence", "decoders": decoder}, "model": model}


def build_tokenizer(gg: Gguf):
    model = gg.field("tokenizer.ggml.model")
    types = gg.field("tokenizer.ggml.token_type")
    if model == "llama":
        tokens, parts = spm_tokenizer(gg, gg.field("general.architecture"))
        return {"version": "1.0", "truncation": None, "padding": None,
                "added_tokens": added_tokens(tokens, types, special_types=(2, 3)), **parts}
    if model != "gpt2":
        sys.exit(f"unsupported tokenizer model {model!r} (gpt2 byte-level BPE, llama SentencePiece)")
    tokens = gg.field("tokenizer.ggml.tokens")
    merges = gg.field("tokenizer.ggml.merges")
    pre = gg.field("tokenizer.ggml.pre")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens(tokens, types),
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer_for(pre),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]},
    }
    return tok


# A template that opens with the BOS text itself (Gemma, Llama 3, Mistral)
BOS_OPENING = re.compile(r"^\s*\{\{-?\s*bos_token\s*-?\}\}")


def chat_template(gg: Gguf):
    """The GGUF's chat template, without its opening `{{ bos_token }}` where the GGUF also sets
    add_bos_token: the server puts BOS before every prompt itself (llm.json's add_bos_token),
    so the prompt starts with one BOS, as with transformers, not two."""
    template = gg.field("tokenizer.chat_template") or ""
    if gg.field("tokenizer.ggml.add_bos_token", False):
        template = BOS_OPENING.sub("", template, count=1)
    return template


def added_tokens(tokens, types, special_types=(3,)):
    """The tokens matched whole in text: CONTROL (special) and USER_DEFINED ones."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": ty in special_types}
            for i, (t, ty) in enumerate(zip(tokens, types)) if ty in special_types or ty == 4]


# --------------------------------------------------------------------------- main
def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("outdir")
    ap.add_argument("--quant", choices=["none", "int4"], default="none")
    ap.add_argument("--block-size", type=int, default=64,
                    help="MatMulNBits block (along K) of the 4-bit projections; must divide every K")
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--attention", choices=["ops", "gqa", "gqa-shared"], default="ops",
                    help="ops: attention from standard ops; gqa: com.microsoft GroupQueryAttention (an "
                         "experiment: no faster on the CPUs measured, see docs/llm.md); gqa-shared: "
                         "GroupQueryAttention over one preallocated KV buffer per layer, rows right-padded, "
                         "seqlens_k and total_sequence_length instead of attention_mask (a different "
                         "interface; models/bench_kv_layout.py)")
    ap.add_argument("--sha256", help="sha256 of the GGUF file (computed when absent)")
    convert(ap.parse_args())


def convert(a):
    """Writes the model directory a.outdir from a.gguf (a: main()'s options)."""
    log(f"reading {a.gguf}")
    gg = Gguf(a.gguf)
    digest = a.sha256 or sha256_file(a.gguf)
    model, meta = build(gg, a.quant, a.block_size, a.accuracy_level, a.attention)
    os.makedirs(a.outdir, exist_ok=True)
    tmp = os.path.join(a.outdir, "model.onnx.tmp")
    log("writing model.onnx")
    onnx.save_model(model, tmp)
    os.replace(tmp, os.path.join(a.outdir, "model.onnx"))

    log("writing tokenizer.json, chat_template.jinja, llm.json")
    with open(os.path.join(a.outdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(build_tokenizer(gg), f, ensure_ascii=False)
    template = chat_template(gg)
    with open(os.path.join(a.outdir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    tokens = gg.field("tokenizer.ggml.tokens")
    eos = int(gg.field("tokenizer.ggml.eos_token_id"))
    eos_ids = [eos]
    # the turn and text ends of ChatML (SmolLM, Qwen), Llama 3, Phi-3 and Gemma
    for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
                    "<end_of_turn>"):
        if special in tokens and tokens.index(special) not in eos_ids:
            eos_ids.append(tokens.index(special))
    bos = gg.field("tokenizer.ggml.bos_token_id")
    pad = gg.field("tokenizer.ggml.padding_token_id", eos)
    cfg = {
        "format": 1,
        "architecture": meta["arch"],
        "num_layers": meta["L"],
        "num_kv_heads": meta["n_kv"],
        "head_dim": meta["hd"],
        "vocab_size": meta["vocab"],
        "context_length": meta["ctx"],
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_ids": eos_ids,
        "pad_token_id": int(pad),
        "add_bos_token": bool(gg.field("tokenizer.ggml.add_bos_token", False)),
        "quantization": a.quant,
        "source": {"gguf": os.path.basename(a.gguf), "sha256": digest},
        "defaults": {"max_tokens": 256, "temperature": 0.0},
    }
    with open(os.path.join(a.outdir, "llm.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    size = os.path.getsize(os.path.join(a.outdir, "model.onnx")) / 1e6
    log(f"done: {a.outdir} (model.onnx {size:.0f} MB)")


if __name__ == "__main__":
    main()
