"""Encoders served from text (docs/encoders.md), against the real models and the reference.

The model directories come from `make models` (.cache/models/encoders/<name>/1;
FERRITE_ENCODERS_DIR overrides the parent directory): the embedding model
all-minilm-l6-v2, and the first rerank and classification models found there. The
reference is models/encoder_reference.py (tokenizers + onnxruntime + numpy pooling, each
input run alone, unpadded). Without them the tests fail under CI=true and are skipped
loudly otherwise.

Clients: the official `openai` SDK for /v1/embeddings, raw HTTP for TEI's /embed, /rerank
and /predict and for malformed requests, `tritonclient` for gRPC ModelInfer with a BYTES
`text_input`.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import ferrite_testlib as fl

EMBED = "minilm"
RERANK = "reranker"
CLASSIFY = "classifier"
ENCODERS_DIR = Path(os.environ.get("FERRITE_ENCODERS_DIR") or fl.REPO_ROOT / ".cache" / "models" / "encoders")
EMBED_DIR = ENCODERS_DIR / "all-minilm-l6-v2" / "1"
COSINE = 0.99999

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    "Deep learning models turn text into vectors.",
    "Paris is the capital of France.",
    "I really loved this movie, it was wonderful!",
    "This was the worst meal I have ever had.",
    "Kubernetes schedules pods onto nodes.",
    "Ünïcödé tëxt, emoji 🙂 and 中文字符 survive tokenization.",
    "short",
    "",
    # About 200 tokens: padded batches mix it with the short ones.
    " ".join(["The committee reviewed the proposal in detail and asked for revisions."] * 15),
]
# Longer than max_length (256 tokens): refused unless truncation is asked for.
TOO_LONG = " ".join(["word"] * 400)


def reference():
    path = fl.REPO_ROOT / "models"
    if not (path / "encoder_reference.py").is_file():
        fl.missing(f"{path}/encoder_reference.py not found (the encoder reference pipeline)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import encoder_reference

    return encoder_reference


def task_dir(task: str) -> Path | None:
    """The first model directory of `task` under ENCODERS_DIR."""
    for config in sorted(ENCODERS_DIR.glob("*/1/encoder.json")):
        if json.loads(config.read_text()).get("task") == task:
            return config.parent
    return None


def need(task: str) -> Path:
    found = task_dir(task)
    if found is None:
        fl.missing(f"no {task} model under {ENCODERS_DIR}; run `make models`")
    return found


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_close_rows(got, want, what: str):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    for i, (g, w) in enumerate(zip(got, want)):
        c = cosine(g, w)
        assert c >= COSINE, f"{what}: input {i} cosine {c:.7f} < {COSINE}"


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def want(ref):
    """The reference embeddings of SENTENCES."""
    return ref.embed(str(EMBED_DIR), SENTENCES)


@pytest.fixture(scope="module")
def enc_server(logs_dir, model_repo):
    if not (EMBED_DIR / "encoder.json").is_file():
        fl.missing(f"encoder model directory {EMBED_DIR} not found; run `make models`")
    args = ["--model", f"{EMBED}={EMBED_DIR}", "--model", f"addsub={model_repo / 'add_sub' / '1' / 'model.onnx'}"]
    for name, task in ((RERANK, "rerank"), (CLASSIFY, "classification")):
        found = task_dir(task)
        if found is not None:
            args += ["--model", f"{name}={found}"]
    s = fl.FerriteServer(args, logs_dir, name="encoders")
    s.start()
    yield s
    rc = s.terminate()
    assert rc == 0, f"encoder server exited with {rc} after SIGTERM\n{s.log_tail()}"


def post(server, path: str, body, headers: dict | None = None):
    """(status, parsed JSON or raw bytes) of a JSON POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, raw = server.http_request(
        "POST", path, data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.http_base}/v1", api_key="unused", max_retries=0, timeout=120)


def token_counts(texts) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(EMBED_DIR / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return sum(len(tok.encode(t).ids) for t in texts)


# ------------------------------------------------------------------ /v1/embeddings


def test_openai_sdk_embeddings_match_the_reference(enc_server, want):
    client = openai_client(enc_server)
    # encoding_format float, and the SDK's default (it asks for base64 and decodes it).
    for kw in ({"encoding_format": "float"}, {}):
        reply = client.embeddings.create(model=EMBED, input=SENTENCES, **kw)
        assert reply.model == EMBED and reply.object == "list"
        assert [d.index for d in reply.data] == list(range(len(SENTENCES)))
        assert_close_rows([d.embedding for d in reply.data], want, f"openai sdk {kw}")
        assert reply.usage.prompt_tokens == reply.usage.total_tokens == token_counts(SENTENCES)
    one = client.embeddings.create(model=EMBED, input=SENTENCES[0], encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert cosine(one.data[0].embedding, want[0]) >= COSINE
    # Unit vectors: the model normalizes.
    assert abs(np.linalg.norm(one.data[0].embedding) - 1.0) < 1e-5


def test_models_list_embedding_models(enc_server):
    names = [m.id for m in openai_client(enc_server).models.list().data]
    assert EMBED in names and "addsub" not in names and RERANK not in names, names
    assert openai_client(enc_server).models.retrieve(EMBED).id == EMBED
    status, body = enc_server.http_get("/v1/models/addsub")
    assert status == 404, body


def test_base64_is_the_same_floats(enc_server):
    status, floats = post(enc_server, "/v1/embeddings", {"model": EMBED, "input": SENTENCES[:3]})
    assert status == 200, floats
    status, b64 = post(enc_server, "/v1/embeddings", {"model": EMBED, "input": SENTENCES[:3], "encoding_format": "base64"})
    assert status == 200, b64
    for f, b in zip(floats["data"], b64["data"]):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(f["embedding"], np.float32))


def test_token_id_inputs(enc_server, ref, want):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(EMBED_DIR / "tokenizer.json"))
    tok.no_padding()
    ids = [tok.encode(t).ids for t in SENTENCES[:2]]
    status, body = post(enc_server, "/v1/embeddings", {"model": EMBED, "input": ids})
    assert status == 200, body
    assert_close_rows([d["embedding"] for d in body["data"]], want[:2], "token id input")
    status, body = post(enc_server, "/v1/embeddings", {"model": EMBED, "input": ids[0]})
    assert status == 200 and len(body["data"]) == 1, body
    assert body["usage"]["prompt_tokens"] == len(ids[0])


def test_dimensions(enc_server):
    status, body = post(enc_server, "/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 384})
    assert status == 200 and len(body["data"][0]["embedding"]) == 384, body
    # all-MiniLM-L6-v2 lists no Matryoshka sizes: only its full size.
    status, body = post(enc_server, "/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 128})
    assert status == 400 and "dimensions 128 is not supported" in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"


def test_concurrent_mixed_lengths_batch_together_and_match(enc_server, want):
    """Many clients at once, short and ~200-token inputs mixed: the batcher pads them
    together, and every answer still matches the reference run alone."""
    before = fl.parse_metrics(enc_server.metrics_text())
    batches_before = fl.metric_sum(before, "ferrite_batch_size_count", model=EMBED)
    inputs_before = fl.metric_sum(before, "ferrite_batch_size_sum", model=EMBED)
    rng = np.random.default_rng(0)
    jobs = [rng.choice(len(SENTENCES), size=int(rng.integers(1, 5)), replace=False).tolist() for _ in range(96)]

    def call(indices):
        status, body = post(enc_server, "/v1/embeddings", {"model": EMBED, "input": [SENTENCES[i] for i in indices]})
        assert status == 200, body
        return indices, [d["embedding"] for d in body["data"]]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, jobs))
    for indices, rows in results:
        assert_close_rows(rows, want[indices], f"concurrent request {indices}")
    after = fl.parse_metrics(enc_server.metrics_text())
    batches = fl.metric_sum(after, "ferrite_batch_size_count", model=EMBED) - batches_before
    inputs = fl.metric_sum(after, "ferrite_batch_size_sum", model=EMBED) - inputs_before
    assert inputs == sum(len(j) for j in jobs)
    assert batches < len(jobs), f"{batches} batches for {len(jobs)} concurrent requests: nothing was batched together"
    assert fl.metric_sum(after, "ferrite_batch_tokens_count", model=EMBED) > 0
    # The autoscaler's inputs exist for the encoder, and are back to 0.
    assert fl.metric_find(after, "ferrite_queue_depth", model=EMBED) is not None
    assert fl.metric_sum(after, "ferrite_inflight_requests", model=EMBED) == 0


# ------------------------------------------------------------------ TEI


def test_tei_embed(enc_server, ref, want):
    status, body = post(enc_server, "/embed", {"inputs": SENTENCES})
    assert status == 200, body
    assert_close_rows(body, want, "/embed")
    status, body = post(enc_server, "/embed", {"inputs": SENTENCES[0]})
    assert status == 200 and len(body) == 1 and len(body[0]) == 384, body
    # normalize: false gives the pooled vector as it is: same direction, another length.
    status, raw = post(enc_server, "/embed", {"inputs": SENTENCES[:2], "normalize": False})
    assert status == 200, raw
    assert all(abs(np.linalg.norm(r) - 1.0) > 1e-3 for r in raw)
    assert_close_rows(raw, want[:2], "/embed normalize=false")
    # Too long: 413 unless truncate; truncated, it is the reference's (which cuts at max_length).
    status, body = post(enc_server, "/embed", {"inputs": [SENTENCES[0], TOO_LONG]})
    assert status == 413 and body["error_type"] == "validation", body
    assert "more than the 256" in body["error"]
    status, body = post(enc_server, "/embed", {"inputs": [TOO_LONG], "truncate": True})
    assert status == 200, body
    assert_close_rows(body, ref.embed(str(EMBED_DIR), [TOO_LONG]), "/embed truncate")
    left_text = "alpha beta gamma " + " ".join(["filler"] * 300)
    status, right = post(enc_server, "/embed", {"inputs": [left_text], "truncate": True})
    status2, left = post(enc_server, "/embed", {"inputs": [left_text], "truncate": True, "truncation_direction": "Left"})
    assert status == status2 == 200
    assert cosine(right[0], left[0]) < 0.999, "truncation_direction Left cut the same end as Right"


def test_tei_rerank(enc_server, ref):
    model_dir = need("rerank")
    query = "What is the capital of France?"
    texts = ["Paris is the capital of France.", "Berlin is in Germany.", "The cat sat on the mat.", "France's capital city is Paris, on the Seine."]
    want = ref.rerank(str(model_dir), query, texts)
    status, body = post(enc_server, "/rerank", {"query": query, "texts": texts})
    assert status == 200, body
    assert [r["index"] for r in body] == sorted(range(len(texts)), key=lambda i: -want[i]), (body, want)
    for r in body:
        assert abs(r["score"] - want[r["index"]]) < 1e-4, (r, want)
        assert "text" not in r
    status, body = post(enc_server, "/rerank", {"query": query, "texts": texts, "raw_scores": True, "return_text": True})
    assert status == 200, body
    raw = ref.rerank(str(model_dir), query, texts, raw_scores=True)
    for r in body:
        assert abs(r["score"] - raw[r["index"]]) < 1e-3 and r["text"] == texts[r["index"]]
    status, body = post(enc_server, "/rerank", {"query": query, "texts": []})
    assert status == 400 and body["error_type"] == "empty", body
    status, body = post(enc_server, "/rerank", {"query": query, "texts": [TOO_LONG]})
    assert status == 413 and body["error_type"] == "validation", body


def test_tei_predict(enc_server, ref):
    model_dir = need("classification")
    labels = ref.labels(str(model_dir))
    texts = ["I really loved this movie, it was wonderful!", "This was the worst meal I have ever had.", "It is fine."]
    want = ref.classify(str(model_dir), texts)
    status, body = post(enc_server, "/predict", {"inputs": texts[0]})
    assert status == 200, body
    assert body[0]["label"] == labels[int(np.argmax(want[0]))], (body, want[0])
    assert [p["score"] for p in body] == sorted((p["score"] for p in body), reverse=True)
    status, body = post(enc_server, "/predict", {"inputs": [[t] for t in texts]})
    assert status == 200 and len(body) == len(texts), body
    for got, w in zip(body, want):
        assert got[0]["label"] == labels[int(np.argmax(w))], (got, w)
        by_label = {p["label"]: p["score"] for p in got}
        for label, score in zip(labels, w):
            assert abs(by_label[label] - score) < 1e-4, (got, w)
    status, body = post(enc_server, "/predict", {"inputs": []})
    assert status == 400 and body["error_type"] == "empty", body


def test_tei_model_selection(enc_server):
    # Named by query parameter or header; another kind of model is TEI's 424.
    status, body = post(enc_server, f"/embed?model={EMBED}", {"inputs": "x"})
    assert status == 200, body
    status, body = post(enc_server, "/embed", {"inputs": "x"}, headers={"x-ferrite-model": EMBED})
    assert status == 200, body
    status, body = post(enc_server, "/rerank?model=" + EMBED, {"query": "q", "texts": ["t"]})
    assert status == 424 and body["error_type"] == "backend" and "not a rerank model" in body["error"], body
    status, body = post(enc_server, "/embed?model=nope", {"inputs": "x"})
    assert status == 404, body
    status, body = post(enc_server, "/embed?model=addsub", {"inputs": "x"})
    assert status == 424 and "takes no text" in body["error"], body


# ------------------------------------------------------------------ gRPC


def test_grpc_text_input(enc_server, want):
    import tritonclient.grpc as grpcclient

    client = enc_server.grpc_client()
    try:
        data = np.array([s.encode() for s in SENTENCES], dtype=np.object_)
        text = grpcclient.InferInput("text_input", [len(SENTENCES)], "BYTES")
        text.set_data_from_numpy(data)
        result = client.infer(EMBED, [text])
        got = result.as_numpy("embedding")
        assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
        assert_close_rows(got, want, "gRPC ModelInfer")
        config = client.get_model_config(EMBED, as_json=True)["config"]
        assert config["backend"] == "ferrite_encoder"
        assert config["parameters"]["task"]["string_value"] == "embedding"
        bad = grpcclient.InferInput("text_input", [1], "INT32")
        bad.set_data_from_numpy(np.array([1], dtype=np.int32))
        with fl.expect_grpc_error("INVALID_ARGUMENT", "must be BYTES"):
            client.infer(EMBED, [bad])
        long = grpcclient.InferInput("text_input", [1], "BYTES")
        long.set_data_from_numpy(np.array([TOO_LONG.encode()], dtype=np.object_))
        with fl.expect_grpc_error("INVALID_ARGUMENT", "more than the 256"):
            client.infer(EMBED, [long])
        truncated = client.infer(EMBED, [long], parameters={"truncate": True}).as_numpy("embedding")
        assert truncated.shape == (1, 384)
    finally:
        client.close()


def test_rest_text_input(enc_server, want):
    import tritonclient.http as httpclient

    client = enc_server.http_client()
    try:
        text = httpclient.InferInput("text_input", [3], "BYTES")
        text.set_data_from_numpy(np.array([s.encode() for s in SENTENCES[:3]], dtype=np.object_), binary_data=False)
        got = client.infer(EMBED, [text]).as_numpy("embedding")
        assert got.shape == (3, 384)
        assert_close_rows(got, want[:3], "REST infer")
    finally:
        client.close()


def test_grpc_rerank_and_classify(enc_server, ref):
    import tritonclient.grpc as grpcclient

    rerank_dir, classify_dir = need("rerank"), need("classification")
    client = enc_server.grpc_client()
    try:
        texts = ["Paris is the capital of France.", "The cat sat on the mat."]
        query = grpcclient.InferInput("query", [1], "BYTES")
        query.set_data_from_numpy(np.array([b"What is the capital of France?"], dtype=np.object_))
        text = grpcclient.InferInput("text_input", [2], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
        scores = client.infer(RERANK, [query, text]).as_numpy("scores")
        want = ref.rerank(str(rerank_dir), "What is the capital of France?", texts)
        np.testing.assert_allclose(scores, want, atol=1e-4)
        probs = client.infer(CLASSIFY, [text]).as_numpy("scores")
        np.testing.assert_allclose(probs, ref.classify(str(classify_dir), texts), atol=1e-4)
        labels = json.loads(client.get_model_config(CLASSIFY, as_json=True)["config"]["parameters"]["labels"]["string_value"])
        assert labels == ref.labels(str(classify_dir))
    finally:
        client.close()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/v1/embeddings", {"model": EMBED, "input": []}, 400, "must not be empty"),
        ("/v1/embeddings", {"model": EMBED, "input": 42}, 400, "invalid request body"),
        ("/v1/embeddings", {"model": EMBED, "input": ["a", 1]}, 400, "mixes"),
        ("/v1/embeddings", {"model": EMBED, "input": [[999999999]]}, 400, "not in the vocabulary"),
        ("/v1/embeddings", {"model": EMBED, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ("/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": -3}, 400, "positive"),
        ("/v1/embeddings", {"model": EMBED, "input": TOO_LONG}, 400, "more than the 256"),
        ("/v1/embeddings", {"model": "nope", "input": "x"}, 404, "not loaded"),
        ("/v1/embeddings", {"model": "addsub", "input": "x"}, 400, "not an embedding model"),
        ("/v1/embeddings", {"input": "x"}, 400, "missing field `model`"),
        ("/v1/embeddings", b"{not json", 400, "invalid request body"),
        ("/embed", {"inputs": []}, 400, "cannot be empty"),
        ("/embed", {"inputs": {"a": 1}}, 422, "invalid request body"),
        ("/embed", {"inputs": "x", "truncation_direction": "Up"}, 422, "truncation_direction"),
        ("/embed", {"inputs": "x", "prompt_name": "query"}, 422, "prompt_name"),
        ("/embed", b"{", 400, "invalid request body"),
        ("/rerank", {"query": "q"}, 422, "missing field `texts`"),
        ("/predict", {"inputs": ["a", "b", "c"]}, 422, "pair"),
    ],
)
def test_bad_input_gets_the_right_status(enc_server, path, body, status, needle):
    got, reply = post(enc_server, path, body)
    assert got == status, (got, reply)
    text = json.dumps(reply) if not isinstance(reply, bytes) else reply.decode()
    assert needle in text, text
    if path == "/v1/embeddings":
        assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
        if status == 400 and needle == "more than the 256":
            assert reply["error"]["code"] == "context_length_exceeded"
    else:
        assert set(reply) == {"error", "error_type"}, reply
    assert enc_server.alive()


def test_queue_full_is_429(server_factory):
    """A queue of one request: a burst gets refusals, OpenAI- and TEI-shaped."""
    if not (EMBED_DIR / "encoder.json").is_file():
        fl.missing(f"encoder model directory {EMBED_DIR} not found; run `make models`")
    s = server_factory(["--model", f"{EMBED}={EMBED_DIR}", "--max-queue-size", "1", "--max-batch-size", "4"])
    long_inputs = [SENTENCES[-1]] * 16
    statuses: list[tuple[str, int, object]] = []
    lock = threading.Lock()

    def call(i):
        path, body = (("/v1/embeddings", {"model": EMBED, "input": long_inputs}) if i % 2 else ("/embed", {"inputs": long_inputs}))
        status, reply = post(s, path, body)
        with lock:
            statuses.append((path, status, reply))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(call, range(16)))
    assert {st for _, st, _ in statuses} <= {200, 429}, statuses
    refused = [(p, r) for p, st, r in statuses if st == 429]
    assert refused, "no request was refused with a queue of one"
    assert any(st == 200 for _, st, _ in statuses)
    for path, reply in refused:
        if path == "/embed":
            assert reply["error_type"] == "overloaded", reply
        else:
            assert reply["error"]["type"] == "rate_limit_error", reply
    assert s.alive()
