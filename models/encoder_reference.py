#!/usr/bin/env python3
"""Reference pipeline for encoder model directories (docs/encoders.md): the `tokenizers`
package + ONNX Runtime + numpy pooling, what the server's answers are checked against.

Every text (or query/text pair) is run alone, unpadded, so a result never depends on
the other inputs of the call. Truncation follows encoder.json (max_length,
truncation_side); pairs are truncated longest-first, as TEI and sentence-transformers do.

    embed(model_dir, texts)            -> np.ndarray [N, D] (pooled; L2-normalized if normalize)
    rerank(model_dir, query, texts)    -> list[float] (sigmoid of the logit; raw_scores=True: the logit)
    classify(model_dir, texts)         -> list[list[float]] (softmax over labels; raw_scores=True: logits)

    python models/encoder_reference.py MODEL_DIR TEXT [TEXT...]   # prints what the task returns
"""
import functools
import json
import os
import sys

import numpy as np


@functools.lru_cache(maxsize=8)
def load(model_dir):
    """(encoder.json dict, tokenizers.Tokenizer, onnxruntime.InferenceSession, input names) of a directory."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    with open(os.path.join(model_dir, "encoder.json")) as f:
        config = json.load(f)
    if config.get("format") != 1:
        raise ValueError(f"{model_dir}/encoder.json: format {config.get('format')!r}, expected 1")
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(int(config["max_length"]), strategy="longest_first",
                          direction=config.get("truncation_side", "right"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # deterministic summation order, small inputs
    sess = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = tuple(i.name for i in sess.get_inputs())
    return config, tok, sess, names


def _run(model_dir, encoding, output):
    _, _, sess, names = load(model_dir)
    feed = {"input_ids": np.array([encoding.ids], np.int64),
            "attention_mask": np.array([encoding.attention_mask], np.int64)}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.array([encoding.type_ids], np.int64)
    (out,) = sess.run([output], feed)
    return out[0]


def _task(model_dir, task):
    config = load(model_dir)[0]
    if config["task"] != task:
        raise ValueError(f"{model_dir}: task {config['task']!r}, not {task!r}")
    return config


def pool(hidden, mask, mode):
    """One sequence's hidden states [seq, D] pooled as encoder.json's `pooling` says."""
    mask = np.asarray(mask, np.float64)
    if mode == "mean":
        return (hidden * mask[:, None]).sum(0) / max(mask.sum(), 1e-9)
    if mode == "cls":
        return hidden[0]
    if mode == "last":
        return hidden[int(np.nonzero(mask)[0][-1])]
    raise ValueError(f"pooling {mode!r}: mean, cls or last")


def embed(model_dir, texts):
    """Embeddings of `texts` ([N, D] float32), pooled and normalized as encoder.json says."""
    config = _task(model_dir, "embedding")
    tok = load(model_dir)[1]
    rows = []
    for text in texts:
        enc = tok.encode(text)
        v = pool(_run(model_dir, enc, "last_hidden_state").astype(np.float64), enc.attention_mask,
                 config.get("pooling", "mean"))
        if config.get("normalize", False):
            v = v / max(np.linalg.norm(v), 1e-12)
        rows.append(v)
    return np.array(rows, np.float32)


def rerank(model_dir, query, texts, raw_scores=False):
    """One score per text: the cross-encoder's logit for (query, text); sigmoid unless raw_scores."""
    _task(model_dir, "rerank")
    tok = load(model_dir)[1]
    scores = []
    for text in texts:
        logit = float(_run(model_dir, tok.encode(query, text), "logits")[0])
        scores.append(logit if raw_scores else float(1.0 / (1.0 + np.exp(-logit))))
    return scores


def classify(model_dir, texts, raw_scores=False):
    """Per text, one score per label (encoder.json `labels` order): softmax unless raw_scores.
    A text may be a (text, text_pair) tuple for pair classifiers."""
    _task(model_dir, "classification")
    tok = load(model_dir)[1]
    out = []
    for text in texts:
        enc = tok.encode(*text) if isinstance(text, (tuple, list)) else tok.encode(text)
        logits = _run(model_dir, enc, "logits").astype(np.float64)
        if not raw_scores:
            e = np.exp(logits - logits.max())
            logits = e / e.sum()
        out.append([float(x) for x in logits])
    return out


def labels(model_dir):
    """The classifier's label names, index = logit column."""
    return list(load(model_dir)[0]["labels"])


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    model_dir, texts = sys.argv[1], sys.argv[2:]
    task = load(model_dir)[0]["task"]
    if task == "embedding":
        v = embed(model_dir, texts)
        for t, row in zip(texts, v):
            print(f"{t!r}: dim {row.size}, first {[round(float(x), 5) for x in row[:4]]}")
        if len(texts) > 1:
            print("cosine matrix:\n" + np.array2string(v @ v.T, precision=4))
    elif task == "rerank":
        for i, s in sorted(enumerate(rerank(model_dir, texts[0], texts[1:])), key=lambda x: -x[1]):
            print(f"{s:.5f}  {texts[1 + i]!r}")
    else:
        names = labels(model_dir)
        for t, p in zip(texts, classify(model_dir, texts)):
            best = int(np.argmax(p))
            print(f"{names[best]} {p[best]:.4f}  {t!r}")


if __name__ == "__main__":
    main()
