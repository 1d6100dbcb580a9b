"""The servers and model directories of `make bench-embed`
(bench/embed_bench.py): the peers' model directory, infinity and
ferrite-server as processes, and the reference embedding that every answer
is checked against.

The model: all-minilm-l6-v2 as `make models` builds it. ferrite serves the
version directory .cache/models/encoders/all-minilm-l6-v2/1/ (model.onnx,
tokenizer.json, encoder.json); the peers get a directory of their own under
.cache/bench/embed/ holding links to the same model.onnx and tokenizer plus
the Hugging Face files they read (config.json, tokenizer_config.json,
special_tokens_map.json, copied) from .cache/models/encoders-hf/, so that
infinity's optimized graph, which it writes next to the model, stays out of
the shared cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from servers import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
NAME = "all-minilm-l6-v2"
SERVED = CACHE / "models" / "encoders" / NAME / "1"
HF_DIR = CACHE / "models" / "encoders-hf" / NAME
WORK = CACHE / "bench" / "embed"
VENV = CACHE / "bench" / "embed-venv"
PEER_FILES = ["config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def peer_model_dir() -> Path:
    """The peers' directory: model.onnx (the served one) and the HF files,
    made anew when the served model changes (infinity's optimized graph is
    then stale too)."""
    model = SERVED / "model.onnx"
    missing = [p for p in [model, SERVED / "tokenizer.json"] + [HF_DIR / f for f in PEER_FILES[:3]]
               if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(map(str, missing))}: run `make models` first")
    digest = sha256(model)
    out = WORK / f"{NAME}-peers"
    stamp = out / ".stamp"
    # A link whose target moved (another checkout) makes the directory stale too.
    if stamp.exists() and stamp.read_text() == digest and (out / "model.onnx").exists():
        return out
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # infinity hands optimum the path of the ONNX file it found, which
    # optimum accepts only when the directory holds more than one: the
    # Hub's layout (model.onnx and onnx/model.onnx, the same graph) is kept.
    (out / "onnx").mkdir()
    (out / "model.onnx").symlink_to(model)
    (out / "onnx" / "model.onnx").symlink_to(model)
    # Copies, not links: infinity's optimizer writes config.json here.
    shutil.copy(SERVED / "tokenizer.json", out / "tokenizer.json")
    for f in PEER_FILES[:3]:
        shutil.copy(HF_DIR / f, out / f)
    stamp.write_text(digest)
    return out


def wait_http(server: Server, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited ({server.process.returncode}); its log:\n"
                             + server.log_path.read_text()[-4000:])
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.5)
    raise SystemExit(f"{server.name} not ready after {timeout:.0f} s; its log:\n" + server.log_path.read_text()[-4000:])


def peer_env(threads: int) -> dict:
    """Offline (everything from local files), no telemetry, the Hugging Face
    cache inside the benchmark's cache; OMP/MKL threads set like ONNX
    Runtime's for anything that reads them."""
    return os.environ | {
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(WORK / "hf"),
        "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true",
    }


def infinity_version() -> str:
    dist = next((VENV / "lib").glob("python3*/site-packages/infinity_emb-*.dist-info"), None)
    return dist.name.removesuffix(".dist-info").split("-")[1] if dist else "?"


def start_infinity(model_dir: Path, threads: int, log_dir: Path, batch_size: int = 32) -> tuple[Server, str]:
    """infinity's server (`infinity_emb v2`) with its optimum engine on CPU:
    its defaults (ONNX graph optimization on, model warm-up on, batch size
    32) plus mean pooling named explicitly (its optimum engine pools with
    [CLS] unless told). ONNX Runtime's intra-op pool: its default, one
    thread per physical core (`threads` here). Returns the server and its
    embeddings URL."""
    binary = VENV / "bin" / "infinity_emb"
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: run `make bench-embed-venv` (bench/bench.mk)")
    port = free_port()
    argv = [str(binary), "v2", "--model-id", str(model_dir), "--served-model-name", NAME, "--engine", "optimum",
            "--device", "cpu", "--pooling-method", "mean", "--batch-size", str(batch_size),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    server = Server("infinity", argv, peer_env(threads), log_dir / "infinity.log")
    wait_http(server, f"http://127.0.0.1:{port}/health", timeout=600)
    return server, f"http://127.0.0.1:{port}/embeddings"


def ferrite_repository(repo: Path, threads: int) -> None:
    """A model repository with the served model directory linked in and its
    ferrite.json: `threads` intra-op threads, a queue deep enough for 64
    clients of 32 texts; batching left at the server's defaults."""
    d = repo / NAME
    (d / "1").mkdir(parents=True, exist_ok=True)
    for f in ("model.onnx", "tokenizer.json", "encoder.json"):
        link = d / "1" / f
        if not link.exists():
            link.symlink_to(SERVED / f)
    (d / "ferrite.json").write_text(json.dumps({"intra_op_threads": threads, "instance_count": 1,
                                                "max_queue_size": 4096}) + "\n")


def start_ferrite(binary: Path, ort_lib: Path, threads: int, log_dir: Path) -> tuple[Server, str]:
    """ferrite-server (release build) serving the model; returns the server
    and its OpenAI embeddings URL."""
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: run `make release` first")
    repo = log_dir / "ferrite-repo"
    ferrite_repository(repo, threads)
    http = free_port()
    argv = [str(binary), "serve", "--host", "127.0.0.1", "--model-repository", str(repo), "--grpc-port",
            str(free_port()), "--http-port", str(http), "--metrics-port", str(free_port())]
    server = Server("ferrite-server", argv, os.environ | {"ORT_DYLIB_PATH": str(ort_lib), "RUST_LOG": "warn"},
                    log_dir / "ferrite-server.log")
    server.wait_ready(http, [NAME], timeout=180)
    return server, f"http://127.0.0.1:{http}/v1/embeddings"


def reference(texts: list[str]):
    """The reference embeddings (tokenizers + onnxruntime + numpy mean
    pooling and L2 normalization) of the served model, as numpy rows."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SERVED / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.enable_padding()
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    session = ort.InferenceSession(str(SERVED / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in [i.name for i in session.get_inputs()]:
        feeds["token_type_ids"] = np.zeros_like(ids)
    hidden = session.run(["last_hidden_state"], feeds)[0]
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def fetch_openai(url: str, texts: list[str]):
    import numpy as np

    body = json.dumps({"model": NAME, "input": texts}).encode()
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    data = json.load(urllib.request.urlopen(req, timeout=120))["data"]
    return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)


def check(name: str, got, want, minimum: float = 0.9999) -> float:
    """The lowest cosine between `got` and `want` rows; exits when below
    `minimum` (a peer that computes something else is not measured)."""
    import numpy as np

    if got.shape != want.shape:
        raise SystemExit(f"{name} answered shape {got.shape}, expected {want.shape}")
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    if cos.min() < minimum:
        raise SystemExit(f"{name}'s embeddings differ from the reference: lowest cosine {cos.min():.6f}")
    return float(cos.min())
