"""Checks of the encoder models built by models/build_encoders.py (docs/encoders.md).

The ONNX graph written by models/convert_bert.py is compared with an independent
numpy forward pass of BERT, written here from the Hugging Face weight names and
read from the same model.safetensors by a reader of its own (so a mistake in the
converter's reader or name mapping shows): hidden states within ATOL. The served
directories are checked against the contract (inputs, outputs, encoder.json,
tokenizer.json without truncation).

Without the built models (make models) these tests fail under CI=true and skip,
loudly, otherwise.
"""
import json
import math
import os
import struct
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = os.environ.get("FERRITE_ENCODER_MODELS", os.path.join(ROOT, ".cache", "models"))
MINILM = "all-minilm-l6-v2"

ATOL = 1e-4  # fp32 vs fp32, differing only in summation order and erf

SENTENCES = [
    "hello world",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, then naps under the old oak tree by the river.",
    "Kubernetes operators reconcile desired state; ferrite serves ONNX models over HTTP and gRPC.",
    "ünïcödé and emoji 🚀 survive tokenization",
]


def _need(path):
    if not os.path.exists(path):
        msg = f"encoder model missing: {path} (run `make models`)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        print(f"\n*** SKIPPING: {msg} ***", file=sys.stderr)
        pytest.skip(msg)


def served(name):
    path = os.path.join(MODELS, "encoders", name, "1")
    _need(os.path.join(path, "model.onnx"))
    return path


def hf_dir(name):
    path = os.path.join(MODELS, "encoders-hf", name)
    _need(os.path.join(path, "model.safetensors"))
    return path


# --- the independent reference -------------------------------------------------------

def load_weights(path):
    """model.safetensors read through np.memmap (F32 only: what these checkpoints hold)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    w = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        lo, hi = meta["data_offsets"]
        w[name] = np.asarray(mm[lo:hi]).view("<f4").reshape(meta["shape"])
    return w


def _ln(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _gelu(x):
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def bert_forward(w, cfg, ids, mask, types):
    """BertModel's last_hidden_state in float64, straight from the checkpoint's names."""
    w = {k[len("bert."):] if k.startswith("bert.") else k: v.astype(np.float64) for k, v in w.items()}
    eps = cfg["layer_norm_eps"]
    heads = cfg["num_attention_heads"]
    batch, seq = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:seq][None]
         + w["embeddings.token_type_embeddings.weight"][types])
    x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(name, t):
            return t @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        def split(t):
            return t.reshape(batch, seq, heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (split(lin(f"attention.self.{n}", x)) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = (s / s.sum(-1, keepdims=True)) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = _ln(lin("attention.output.dense", ctx) + x, w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"], eps)
        f = lin("output.dense", _gelu(lin("intermediate.dense", x)))
        x = _ln(f + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return x, w


def encode(tokenizer_path, texts, pairs=None):
    """Token ids, mask and types of `texts` (or (query, text) pairs), padded to the longest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    tok.no_truncation()
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0)
    enc = tok.encode_batch(pairs if pairs is not None else texts)
    return (np.array([e.ids for e in enc], np.int64), np.array([e.attention_mask for e in enc], np.int64),
            np.array([e.type_ids for e in enc], np.int64))


def session(path):
    import onnxruntime as ort

    return ort.InferenceSession(os.path.join(path, "model.onnx"), providers=["CPUExecutionProvider"])


# --- all-MiniLM-L6-v2 ----------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    out, hf = served(MINILM), hf_dir(MINILM)
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    return out, hf, cfg, load_weights(os.path.join(hf, "model.safetensors"))


def test_minilm_graph_matches_numpy_bert(minilm):
    out, hf, cfg, w = minilm
    ids, mask, types = encode(os.path.join(out, "tokenizer.json"), SENTENCES)
    assert mask.sum(1).min() < ids.shape[1], "the batch should contain padding"
    (got,) = session(out).run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                      "token_type_ids": types})
    want, _ = bert_forward(w, cfg, ids, mask, types)
    assert got.shape == (len(SENTENCES), ids.shape[1], cfg["hidden_size"])
    assert got.dtype == np.float32
    valid = mask.astype(bool)
    diff = np.abs(got[valid] - want[valid]).max()
    print(f"max |onnx - numpy| over {valid.sum()} tokens: {diff:.2e}")
    assert diff < ATOL


def test_minilm_token_types_reach_the_graph(minilm):
    # A pair (token_type 1 on the second segment) is also matched, so token_type_ids is wired.
    out, hf, cfg, w = minilm
    ids, mask, types = encode(os.path.join(out, "tokenizer.json"), None,
                              pairs=[("what is ferrite?", "a model server"), ("q", "a longer second segment here")])
    assert types.max() == 1
    (got,) = session(out).run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    want, _ = bert_forward(w, cfg, ids, mask, types)
    valid = mask.astype(bool)
    assert np.abs(got[valid] - want[valid]).max() < ATOL
    (zero,) = session(out).run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": 0 * types})
    assert np.abs(zero[valid] - got[valid]).max() > 1e-3


def test_minilm_rows_do_not_depend_on_padding(minilm):
    out = minilm[0]
    sess = session(out)
    ids, mask, types = encode(os.path.join(out, "tokenizer.json"), SENTENCES)
    (batch,) = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    for i in range(len(SENTENCES)):
        n = int(mask[i].sum())
        (alone,) = sess.run(None, {"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n],
                                   "token_type_ids": types[i:i + 1, :n]})
        assert np.abs(alone[0] - batch[i, :n]).max() < 1e-5


def test_minilm_known_embedding(minilm):
    # sentence-transformers' all-MiniLM-L6-v2 embedding of "hello world" (first 5 of 384),
    # as published with the model; mean pooling + L2 normalization.
    out = minilm[0]
    ids, mask, types = encode(os.path.join(out, "tokenizer.json"), ["hello world"])
    (h,) = session(out).run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    v = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(v[0, :5], [-0.0344773, 0.0310232, 0.0067350, 0.0261090, -0.0393620], atol=2e-5)


def test_minilm_directory_follows_the_contract(minilm):
    out = minilm[0]
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == ["encoder.json", "model.onnx",
                                                                           "tokenizer.json"]
    with open(os.path.join(out, "encoder.json")) as f:
        enc = json.load(f)
    assert enc == {"format": 1, "task": "embedding", "pooling": "mean", "normalize": True, "max_length": 256,
                   "truncation_side": "right"}
    with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    assert tok["truncation"] is None, "the server truncates (encoder.json max_length), not the tokenizer"
    assert tok["padding"]["strategy"] == "BatchLongest"
    sess = session(out)
    assert [(i.name, i.type) for i in sess.get_inputs()] == [
        ("input_ids", "tensor(int64)"), ("attention_mask", "tensor(int64)"), ("token_type_ids", "tensor(int64)")]
    assert [(o.name, o.type, o.shape[2]) for o in sess.get_outputs()] == [
        ("last_hidden_state", "tensor(float)", 384)]
    # The peers' copy (Optimum layout) holds the same graph.
    hf = minilm[1]
    for rel in ("model.onnx", "onnx/model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(hf, rel)), rel


# --- the reference pipeline (models/encoder_reference.py) ----------------------------

def test_reference_embed_is_pooled_normalized_and_truncated(minilm):
    sys.path.insert(0, HERE)
    import encoder_reference as ref

    out = minilm[0]
    v = ref.embed(out, ["hello world", "A man is eating food."])
    assert v.shape == (2, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(v[0, :5], [-0.0344773, 0.0310232, 0.0067350, 0.0261090, -0.0393620], atol=2e-5)
    # Alone or with others: the same vector (each text runs unpadded).
    np.testing.assert_array_equal(ref.embed(out, ["A man is eating food."])[0], v[1])
    # Past max_length (256 tokens with [CLS] and [SEP]) the tail is cut: 300 words embed like 254.
    words = [f"w{i % 7}" for i in range(300)]
    long = ref.embed(out, [" ".join(words)])[0]
    tok = ref.load(out)[1]
    assert len(tok.encode(" ".join(words)).ids) == 256
    kept = tok.decode(tok.encode(" ".join(words)).ids)
    assert float(long @ ref.embed(out, [kept])[0]) > 0.99999
    with pytest.raises(ValueError, match="task 'embedding', not 'rerank'"):
        ref.rerank(out, "q", ["t"])
