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


# --- the classification head on small random checkpoints ------------------------------
# No trained cross-encoder or classifier is shipped by a package (docs/encoders.md), so the
# converter's `classification` head is checked on random-weight BERT and DistilBERT
# checkpoints written here, against numpy forwards of their own.

def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _random_checkpoint(tmp_path, kind, labels=3, hidden=32, layers=2, heads=4, inter=64, vocab=100, pos=64):
    rng = np.random.default_rng(7)
    r = lambda *shape: rng.normal(0, 0.2, shape)  # noqa: E731
    ln = lambda: (1 + r(hidden), r(hidden))  # noqa: E731
    t = {}
    pre = "bert." if kind == "bert" else "distilbert."
    t[pre + "embeddings.word_embeddings.weight"] = r(vocab, hidden)
    t[pre + "embeddings.position_embeddings.weight"] = r(pos, hidden)
    t[pre + "embeddings.LayerNorm.weight"], t[pre + "embeddings.LayerNorm.bias"] = ln()
    if kind == "bert":
        t[pre + "embeddings.token_type_embeddings.weight"] = r(2, hidden)
        names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "o": "attention.output.dense", "ln1": "attention.output.LayerNorm", "f1": "intermediate.dense",
                 "f2": "output.dense", "ln2": "output.LayerNorm"}
        lp = pre + "encoder.layer.{}."
        config = {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers,
                  "num_attention_heads": heads, "intermediate_size": inter, "hidden_act": "gelu",
                  "layer_norm_eps": 1e-12, "type_vocab_size": 2, "vocab_size": vocab,
                  "max_position_embeddings": pos}
        t["bert.pooler.dense.weight"], t["bert.pooler.dense.bias"] = r(hidden, hidden), r(hidden)
        t["classifier.weight"], t["classifier.bias"] = r(labels, hidden), r(labels)
    else:
        names = {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
                 "ln1": "sa_layer_norm", "f1": "ffn.lin1", "f2": "ffn.lin2", "ln2": "output_layer_norm"}
        lp = pre + "transformer.layer.{}."
        config = {"model_type": "distilbert", "dim": hidden, "n_layers": layers, "n_heads": heads,
                  "hidden_dim": inter, "activation": "gelu", "vocab_size": vocab, "max_position_embeddings": pos}
        t["pre_classifier.weight"], t["pre_classifier.bias"] = r(hidden, hidden), r(hidden)
        t["classifier.weight"], t["classifier.bias"] = r(labels, hidden), r(labels)
    for i in range(layers):
        p = lp.format(i)
        for part in ("q", "k", "v", "o"):
            t[p + names[part] + ".weight"], t[p + names[part] + ".bias"] = r(hidden, hidden), r(hidden)
        t[p + names["f1"] + ".weight"], t[p + names["f1"] + ".bias"] = r(inter, hidden), r(inter)
        t[p + names["f2"] + ".weight"], t[p + names["f2"] + ".bias"] = r(hidden, inter), r(hidden)
        for part in ("ln1", "ln2"):
            t[p + names[part] + ".weight"], t[p + names[part] + ".bias"] = ln()
    src = tmp_path / kind
    src.mkdir()
    write_safetensors(src / "model.safetensors", t)
    (src / "config.json").write_text(json.dumps(config))
    return str(src), config, {k: v.astype(np.float32).astype(np.float64) for k, v in t.items()}


def distilbert_forward(w, cfg, ids, mask):
    """DistilBertModel's hidden states, from its own weight names."""
    w = {k[len("distilbert."):] if k.startswith("distilbert.") else k: v for k, v in w.items()}
    heads, (batch, seq) = cfg["n_heads"], ids.shape
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:seq][None]
    x = _ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], 1e-12)
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(cfg["n_layers"]):
        p = f"transformer.layer.{i}."

        def lin(name, t):
            return t @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (lin(f"attention.{n}_lin", x).reshape(batch, seq, heads, -1).transpose(0, 2, 1, 3)
                   for n in ("q", "k", "v"))
        s = (q / math.sqrt(q.shape[-1])) @ k.transpose(0, 1, 3, 2) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = _ln(lin("attention.out_lin", ctx) + x, w[p + "sa_layer_norm.weight"], w[p + "sa_layer_norm.bias"], 1e-12)
        f = lin("ffn.lin2", _gelu(lin("ffn.lin1", x)))
        x = _ln(f + x, w[p + "output_layer_norm.weight"], w[p + "output_layer_norm.bias"], 1e-12)
    return x


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_classification_head_matches_numpy(tmp_path, kind):
    sys.path.insert(0, HERE)
    from convert_bert import convert

    src, cfg, w = _random_checkpoint(tmp_path, kind)
    out = str(tmp_path / "model.onnx")
    convert(src, out, "classification")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg["vocab_size"], (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    import onnxruntime as ort

    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        types = (np.arange(9) >= 4).astype(np.int64)[None].repeat(3, 0)
        feed["token_type_ids"] = types
        h, _ = bert_forward(w, cfg | {"layer_norm_eps": 1e-12}, ids, mask, types)
        pooled = np.tanh(h[:, 0] @ w["bert.pooler.dense.weight"].T + w["bert.pooler.dense.bias"])
    else:
        assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
        h = distilbert_forward(w, cfg, ids, mask)
        pooled = np.maximum(h[:, 0] @ w["pre_classifier.weight"].T + w["pre_classifier.bias"], 0)
    want = pooled @ w["classifier.weight"].T + w["classifier.bias"]
    (got,) = sess.run(["logits"], feed)
    assert got.shape == (3, 3)
    print(f"{kind}: max |onnx - numpy| logits {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() < ATOL


# --- the rerank and classification models built from all-MiniLM-L6-v2 -------------------

RERANK = "minilm-l6-cosine-rerank"
SENTIMENT = "minilm-l6-sentiment-zeroshot"
QUERY = "How many people live in Berlin?"
PASSAGES = ["Berlin has a population of 3,520,031 registered inhabitants in an area of 891.82 square kilometers.",
            "New York City is famous for the Metropolitan Museum of Art.",
            "Berlin is well known for its museums.",
            "The capital of Germany is Berlin, its largest city by population.",
            "ok"]


def test_rerank_logit_is_the_embedding_cosine():
    sys.path.insert(0, HERE)
    import encoder_reference as ref

    rr, emb = served(RERANK), served(MINILM)
    v = ref.embed(emb, [QUERY] + PASSAGES)
    want = v[1:] @ v[0]
    got = ref.rerank(rr, QUERY, PASSAGES, raw_scores=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Batched with padding (rows of different lengths): the same logits.
    ids, mask, types = encode(os.path.join(rr, "tokenizer.json"), None, pairs=[(QUERY, p) for p in PASSAGES])
    (batch,) = session(rr).run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    assert batch.shape == (len(PASSAGES), 1)
    np.testing.assert_allclose(batch[:, 0], want, atol=1e-5)
    sig = ref.rerank(rr, QUERY, PASSAGES)
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-want)), atol=1e-5)
    assert np.argmax(got) == 0 and np.argmin(got) == 4
    with open(os.path.join(rr, "encoder.json")) as f:
        assert json.load(f) == {"format": 1, "task": "rerank", "truncation_side": "right", "max_length": 256}


POSITIVE = ["I loved this movie, it was fantastic.", "What a wonderful experience, the staff were so kind.",
            "The food was delicious and the service excellent.", "Best purchase I have made all year.",
            "This book is a delight from start to finish.", "The concert was amazing and the crowd was great.",
            "Highly recommended, works perfectly.", "A charming, funny and moving film.",
            "I am very happy with the result.", "The hotel room was clean, quiet and comfortable.",
            "Great value for money.", "She gave a brilliant performance.", "I loved it", "Awesome!", "so good",
            "Thank you, this made my day."]
NEGATIVE = ["I hated this movie, it was terrible.", "What an awful experience, the staff were rude.",
            "The food was cold and the service slow.", "Worst purchase I have made all year.",
            "This book is boring from start to finish.", "The concert was a disaster and the sound was bad.",
            "Do not buy this, it broke after one day.", "A dull, lifeless and predictable film.",
            "I am very disappointed with the result.", "The hotel room was dirty, noisy and uncomfortable.",
            "A complete waste of money.", "She gave a dreadful performance.", "What a waste of time", "Awful.",
            "so bad", "This ruined my day."]


def test_sentiment_classifier_labels_and_logits():
    sys.path.insert(0, HERE)
    import encoder_reference as ref

    cls, emb = served(SENTIMENT), served(MINILM)
    assert ref.labels(cls) == ["NEGATIVE", "POSITIVE"]
    texts = POSITIVE + NEGATIVE
    probs = np.array(ref.classify(cls, texts))
    assert probs.shape == (len(texts), 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    pred = probs.argmax(1)
    truth = np.array([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    acc = float((pred == truth).mean())
    print(f"zero-shot sentiment: {int((pred == truth).sum())}/{len(texts)} right")
    assert acc >= 0.9
    # logits = 20 x cosine with the label prototypes (mean embeddings of five polar words).
    v = ref.embed(emb, texts[:4])
    words = {"NEGATIVE": ["bad", "terrible", "awful", "disappointing", "hate"],
             "POSITIVE": ["good", "great", "excellent", "wonderful", "love"]}
    p = np.stack([ref.embed(emb, words[k]).mean(0) for k in ("NEGATIVE", "POSITIVE")])
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    np.testing.assert_allclose(ref.classify(cls, texts[:4], raw_scores=True), 20 * v @ p.T, atol=1e-4)
