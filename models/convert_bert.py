#!/usr/bin/env python3
"""BERT-family encoder (safetensors) -> ONNX, without torch.

The graph is written node by node with `onnx.helper` from the weights read with
numpy (a small safetensors reader below). It takes `input_ids`, `attention_mask`
and `token_type_ids` (int64 [batch, seq]) like an Optimum export and returns:

  - `last_hidden_state` FP32 [batch, seq, hidden] (head "none": embedding models);
  - `logits` FP32 [batch, labels] (head "classification": BertForSequenceClassification,
    i.e. tanh pooler on the [CLS] row, then the classifier; cross-encoders are the
    same with one label);
  - `logits` FP32 [batch, 1] (head "pair-cosine": an embedding model used as a reranker,
    the cosine of its pooled embeddings of the pair's two texts, each encoded alone);
  - `logits` FP32 [batch, labels] (head "prototype": an embedding model used as a
    zero-shot classifier, scaled cosines with one prototype embedding per label).

Architectures: `bert` (BertModel names, with or without a `bert.` prefix) and
`distilbert` (DistilBertModel names; no token types, so its graph declares no
`token_type_ids`; head: pre_classifier + ReLU + classifier).

    python models/convert_bert.py SRC_DIR OUT.onnx [--head none|classification|pair-cosine]
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization; old enough for every ONNX Runtime the bench peers pin
IR_VERSION = 8

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def read_safetensors(path):
    """All tensors of a .safetensors file as float32/int numpy arrays (BF16 widened)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        raw = data[lo:hi]
        if meta["dtype"] == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif meta["dtype"] in _DTYPES:
            arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[meta["dtype"]]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        arr = arr.reshape(meta["shape"])
        out[name] = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.copy()
    return out


def load_checkpoint(src):
    """(config dict, weights dict) of a Hugging Face model directory."""
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    st = os.path.join(src, "model.safetensors")
    if not os.path.exists(st):
        raise FileNotFoundError(f"{src}: no model.safetensors (only single-file safetensors checkpoints are read)")
    return config, read_safetensors(st)


def _strip_prefix(weights, prefixes):
    """Drop a task model's base prefix (`bert.`, `distilbert.`) from the encoder's names."""
    out = {}
    for k, v in weights.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


class BertLayout:
    """Canonical view of a BERT-family checkpoint: dims plus named numpy weights.

    `embedding(name)`, `layer(i, part)` return arrays with Hugging Face's (out, in)
    Linear layout; the graph builder and the test's numpy forward both use it, so the
    names of each architecture are mapped once, here.
    """

    def __init__(self, config, weights):
        self.model_type = config.get("model_type", "bert")
        w = _strip_prefix(weights, ("bert.", "distilbert."))
        self.w = w
        if self.model_type == "distilbert":
            self.hidden = config["dim"]
            self.layers = config["n_layers"]
            self.heads = config["n_heads"]
            self.eps = 1e-12
            self.act = config.get("activation", "gelu")
            self.type_vocab = 0
        elif self.model_type == "bert":
            self.hidden = config["hidden_size"]
            self.layers = config["num_hidden_layers"]
            self.heads = config["num_attention_heads"]
            self.eps = config.get("layer_norm_eps", 1e-12)
            self.act = config.get("hidden_act", "gelu")
            self.type_vocab = config.get("type_vocab_size", 2)
            if config.get("position_embedding_type", "absolute") != "absolute":
                raise ValueError("only absolute position embeddings are supported")
        else:
            raise ValueError(f"model_type {self.model_type!r} is not supported (bert, distilbert)")
        if self.act != "gelu":
            raise ValueError(f"activation {self.act!r} is not supported (gelu, the erf form)")
        self.head_dim = self.hidden // self.heads

    def embedding(self, part):
        """word / position / token_type tables, or ln_w / ln_b."""
        if self.model_type == "distilbert":
            names = {"word": "embeddings.word_embeddings.weight",
                     "position": "embeddings.position_embeddings.weight",
                     "ln_w": "embeddings.LayerNorm.weight", "ln_b": "embeddings.LayerNorm.bias"}
        else:
            names = {"word": "embeddings.word_embeddings.weight",
                     "position": "embeddings.position_embeddings.weight",
                     "token_type": "embeddings.token_type_embeddings.weight",
                     "ln_w": "embeddings.LayerNorm.weight", "ln_b": "embeddings.LayerNorm.bias"}
        return self.w[names[part]]

    def layer(self, i, part):
        """One encoder layer's weight: q/k/v/o, ln1, ffn1/ffn2, ln2, each `_w` or `_b`."""
        if self.model_type == "distilbert":
            p = f"transformer.layer.{i}."
            names = {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
                     "o": "attention.out_lin", "ln1": "sa_layer_norm", "ffn1": "ffn.lin1",
                     "ffn2": "ffn.lin2", "ln2": "output_layer_norm"}
        else:
            p = f"encoder.layer.{i}."
            names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                     "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
                     "ffn1": "intermediate.dense", "ffn2": "output.dense", "ln2": "output.LayerNorm"}
        base, kind = part.rsplit("_", 1)
        return self.w[p + names[base] + (".weight" if kind == "w" else ".bias")]

    def head(self):
        """Classification head as [(weight, bias, activation-after)], applied to the [CLS] row."""
        if self.model_type == "distilbert":
            return [(self.w["pre_classifier.weight"], self.w["pre_classifier.bias"], "relu"),
                    (self.w["classifier.weight"], self.w["classifier.bias"], None)]
        if "pooler.dense.weight" not in self.w or "classifier.weight" not in self.w:
            raise ValueError("classification head needs pooler.dense.* and classifier.* weights")
        return [(self.w["pooler.dense.weight"], self.w["pooler.dense.bias"], "tanh"),
                (self.w["classifier.weight"], self.w["classifier.bias"], None)]


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint, arr):
        n = self.name(hint)
        # copy(order="C"), not ascontiguousarray: that one turns scalars into shape [1].
        self.inits.append(numpy_helper.from_array(np.asarray(arr).copy(order="C"), n))
        return n

    def op(self, op_type, inputs, hint=None, **attrs):
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x, w, b, hint):
        """x @ w.T + b, w in (out, in) layout (stored transposed for MatMul)."""
        y = self.op("MatMul", [x, self.const(hint + "_w", w.T.astype(np.float32))], hint + "_mm")
        return self.op("Add", [y, self.const(hint + "_b", b.astype(np.float32))], hint)

    def layer_norm(self, x, w, b, eps, hint):
        return self.op("LayerNormalization", [x, self.const(hint + "_g", w), self.const(hint + "_b", b)],
                       hint, axis=-1, epsilon=float(eps))

    def gelu(self, x, hint):
        """0.5 x (1 + erf(x / sqrt 2)): the pattern ONNX Runtime fuses into Gelu."""
        d = self.op("Div", [x, self.const("sqrt2", np.array(math.sqrt(2.0), np.float32))], hint + "_div")
        e = self.op("Erf", [d], hint + "_erf")
        a = self.op("Add", [e, self.const("one", np.array(1.0, np.float32))], hint + "_add")
        m = self.op("Mul", [x, a], hint + "_mul")
        return self.op("Mul", [m, self.const("half", np.array(0.5, np.float32))], hint)


HEADS = ("none", "classification", "pair-cosine", "prototype")


def _encoder(g, layout, ids, mask_i, types):
    """The encoder body on int64 [batch, seq] tensors; returns the hidden states' name."""
    H, heads, dh = layout.hidden, layout.heads, layout.head_dim
    # Embeddings: word + position (0..seq-1) + token type, then LayerNorm.
    x = g.op("Gather", [g.const("word_embeddings", layout.embedding("word")), ids], "word_emb", axis=0)
    # Positions 0..seq-1: the first `seq` rows of the table (Shape with start/end: opset 15).
    seq = g.op("Shape", [ids], "seq_len", start=1, end=2)
    pos = g.op("Slice", [g.const("position_embeddings", layout.embedding("position")),
                         g.const("zero_1", np.array([0], np.int64)), seq,
                         g.const("zero_1", np.array([0], np.int64))], "pos_emb")
    x = g.op("Add", [x, pos], "emb_wp")
    if types is not None:
        tt = g.op("Gather", [g.const("token_type_embeddings", layout.embedding("token_type")), types],
                  "tt_emb", axis=0)
        x = g.op("Add", [x, tt], "emb_sum")
    x = g.layer_norm(x, layout.embedding("ln_w"), layout.embedding("ln_b"), layout.eps, "emb_ln")

    # Additive mask [batch, 1, 1, seq]: 0 where attended, float32 min where padded (as transformers does).
    m = g.op("Cast", [mask_i], "mask_f", to=TensorProto.FLOAT)
    m = g.op("Sub", [g.const("one", np.array(1.0, np.float32)), m], "mask_inv")
    m = g.op("Mul", [m, g.const("neg", np.array(np.finfo(np.float32).min, np.float32))], "mask_neg")
    mask = g.op("Unsqueeze", [m, g.const("axes12", np.array([1, 2], np.int64))], "mask_4d")

    split_shape = g.const("split_shape", np.array([0, 0, heads, dh], np.int64))
    merge_shape = g.const("merge_shape", np.array([0, 0, H], np.int64))
    scale = g.const("scale", np.array(1.0 / math.sqrt(dh), np.float32))
    for i in range(layout.layers):
        L = lambda part: layout.layer(i, part)  # noqa: E731
        p = f"l{i}"
        q = g.op("Reshape", [g.linear(x, L("q_w"), L("q_b"), p + "_q"), split_shape], p + "_q4")
        k = g.op("Reshape", [g.linear(x, L("k_w"), L("k_b"), p + "_k"), split_shape], p + "_k4")
        v = g.op("Reshape", [g.linear(x, L("v_w"), L("v_b"), p + "_v"), split_shape], p + "_v4")
        q = g.op("Transpose", [q], p + "_qt", perm=[0, 2, 1, 3])
        k = g.op("Transpose", [k], p + "_kt", perm=[0, 2, 3, 1])
        v = g.op("Transpose", [v], p + "_vt", perm=[0, 2, 1, 3])
        s = g.op("MatMul", [q, k], p + "_scores")
        s = g.op("Mul", [s, scale], p + "_scaled")
        s = g.op("Add", [s, mask], p + "_masked")
        a = g.op("Softmax", [s], p + "_probs", axis=-1)
        c = g.op("MatMul", [a, v], p + "_ctx")
        c = g.op("Transpose", [c], p + "_ctxt", perm=[0, 2, 1, 3])
        c = g.op("Reshape", [c, merge_shape], p + "_ctx3")
        o = g.linear(c, L("o_w"), L("o_b"), p + "_o")
        x = g.layer_norm(g.op("Add", [o, x], p + "_res1"), L("ln1_w"), L("ln1_b"), layout.eps, p + "_ln1")
        f = g.gelu(g.linear(x, L("ffn1_w"), L("ffn1_b"), p + "_ffn1"), p + "_gelu")
        f = g.linear(f, L("ffn2_w"), L("ffn2_b"), p + "_ffn2")
        x = g.layer_norm(g.op("Add", [f, x], p + "_res2"), L("ln2_w"), L("ln2_b"), layout.eps, p + "_ln2")
    return x


def _mean_pool_normalized(g, h, mask_i):
    """L2-normalized mean of h [batch, seq, H] over the attended positions -> [batch, H]."""
    m = g.op("Unsqueeze", [g.op("Cast", [mask_i], "pool_mask", to=TensorProto.FLOAT),
                           g.const("axes2", np.array([2], np.int64))], "pool_mask3")
    axes1 = g.const("axes1", np.array([1], np.int64))
    total = g.op("ReduceSum", [g.op("Mul", [h, m], "pool_masked"), axes1], "pool_sum", keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [m, axes1], "pool_count", keepdims=0),
                         g.const("tiny", np.array(1e-9, np.float32))], "pool_count_min")
    mean = g.op("Div", [total, count], "pool_mean")
    # ReduceL2 takes `axes` as an attribute up to opset 17.
    norm = g.op("ReduceL2", [mean], "pool_norm", axes=[-1], keepdims=1)
    norm = g.op("Max", [norm, g.const("tiny", np.array(1e-12, np.float32))], "pool_norm_min")
    return g.op("Div", [mean, norm], "pooled")


def _split_pair(g, ids, mask_i, types):
    """Pair rows [CLS] a [SEP] b [SEP] -> the rows [CLS] a [SEP] (types 0) and [CLS] b [SEP]
    (types 1, moved to the front after the [CLS]), stacked on the batch axis with their masks:
    each row then reads exactly as its text encoded alone."""
    i64 = lambda hint, v: g.const(hint, np.array(v, np.int64))  # noqa: E731
    seg_a = g.op("Mul", [mask_i, g.op("Sub", [i64("one_i", 1), types], "not_b")], "seg_a")
    seg_b = g.op("Mul", [mask_i, types], "seg_b")
    len_a = g.op("ReduceSum", [seg_a, i64("axes1", [1])], "len_a", keepdims=1)          # [batch, 1]
    len_b = g.op("ReduceSum", [seg_b, i64("axes1", [1])], "len_b", keepdims=1)
    seq = g.op("Squeeze", [g.op("Shape", [ids], "pair_seq", start=1, end=2), i64("axes0", [0])], "pair_seq0")
    k = g.op("Range", [i64("zero_i", 0), seq, i64("one_i", 1)], "pair_k")                 # [seq]
    # Row b, column k: [CLS] (column 0) for k = 0, else the pair's column len_a + k - 1 (clamped).
    src = g.op("Add", [len_a, g.op("Sub", [k, i64("one_i", 1)], "k_minus_1")], "b_src")
    src = g.op("Min", [src, g.op("Sub", [seq, i64("one_i", 1)], "seq_last")], "b_src_clamped")
    src = g.op("Where", [g.op("Equal", [k, i64("zero_i", 0)], "k_is_0"), i64("zero_i", 0), src], "b_index")
    ids_b = g.op("GatherElements", [ids, src], "ids_b", axis=1)
    mask_b = g.op("Cast", [g.op("Less", [k, g.op("Add", [len_b, i64("one_i", 1)], "len_b1")], "b_valid")],
                  "mask_b", to=TensorProto.INT64)
    both_ids = g.op("Concat", [ids, ids_b], "both_ids", axis=0)
    both_mask = g.op("Concat", [seg_a, mask_b], "both_mask", axis=0)
    return both_ids, both_mask, g.op("Mul", [both_ids, i64("zero_i", 0)], "both_types")


def build_graph(layout, head="none", prototypes=None, scale=1.0):
    """The ONNX model (onnx.ModelProto) of `layout` with the given head:

    none            `last_hidden_state` [batch, seq, hidden]
    classification  `logits` [batch, labels]: the checkpoint's own head on the [CLS] row
    pair-cosine     `logits` [batch, 1]: cosine of the mean-pooled embeddings of a pair's two
                    texts (token types 0 / 1), each encoded on its own: a bi-encoder as reranker
    prototype       `logits` [batch, labels]: scale * cosine of the mean-pooled embedding with
                    each row of `prototypes` [labels, hidden] (normalized here)
    """
    if head not in HEADS:
        raise ValueError(f"head {head!r}: one of {', '.join(HEADS)}")
    g = _Graph()
    use_tt = layout.type_vocab > 0 or head == "pair-cosine"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
    if use_tt:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"]))
    types = "token_type_ids" if layout.type_vocab > 0 else None

    if head == "pair-cosine":
        both_ids, both_mask, both_types = _split_pair(g, "input_ids", "attention_mask", "token_type_ids")
        x = _encoder(g, layout, both_ids, both_mask, both_types if types else None)
        pooled = _mean_pool_normalized(g, x, both_mask)
        batch = g.op("Shape", ["input_ids"], "batch", start=0, end=1)
        zero1 = g.const("zero_1", np.array([0], np.int64))
        a = g.op("Slice", [pooled, zero1, batch, zero1], "emb_a")
        b = g.op("Slice", [pooled, batch, g.const("end", np.array([2 ** 62], np.int64)), zero1], "emb_b")
        y = g.op("ReduceSum", [g.op("Mul", [a, b], "ab"), g.const("axes1", np.array([1], np.int64))], "cosine",
                 keepdims=1)
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1])]
    else:
        x = _encoder(g, layout, "input_ids", "attention_mask", types)
    if head == "none":
        y = x
        outputs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                                 ["batch", "sequence", layout.hidden])]
    elif head == "classification":
        y = g.op("Gather", [x, g.const("zero_i", np.array(0, np.int64))], "cls_row", axis=1)
        stages = layout.head()
        for j, (w, b, act) in enumerate(stages):
            y = g.linear(y, w, b, f"head{j}")
            if act == "tanh":
                y = g.op("Tanh", [y], f"head{j}_tanh")
            elif act == "relu":
                y = g.op("Relu", [y], f"head{j}_relu")
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", stages[-1][0].shape[0]])]
    elif head == "prototype":
        p = np.asarray(prototypes, np.float64)
        if p.ndim != 2 or p.shape[1] != layout.hidden:
            raise ValueError(f"prototypes: shape {p.shape}, expected [labels, {layout.hidden}]")
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        pooled = _mean_pool_normalized(g, x, "attention_mask")
        y = g.op("MatMul", [pooled, g.const("prototypes_t", (scale * p.T).astype(np.float32))], "scaled_cosines")
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", p.shape[0]])]
    g.nodes.append(helper.make_node("Identity", [y], [outputs[0].name], name=outputs[0].name))

    graph = helper.make_graph(g.nodes, f"{layout.model_type}_encoder", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ferrite-convert-bert")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def convert(src, out, head="none", prototypes=None, scale=1.0):
    """Write `out` (model.onnx) from the Hugging Face directory `src`; returns the layout."""
    config, weights = load_checkpoint(src)
    layout = BertLayout(config, weights)
    model = build_graph(layout, head, prototypes, scale)
    tmp = out + ".tmp"
    onnx.save_model(model, tmp)
    os.replace(tmp, out)
    return layout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="Hugging Face model directory (config.json, model.safetensors)")
    ap.add_argument("out", help="output model.onnx")
    ap.add_argument("--head", choices=("none", "classification", "pair-cosine"), default="none",
                    help="prototype heads are built by models/build_encoders.py (they need label prototypes)")
    a = ap.parse_args()
    layout = convert(a.src, a.out, a.head)
    print(f"{a.out}: {layout.model_type}, {layout.layers} layers, hidden {layout.hidden}, head {a.head}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
