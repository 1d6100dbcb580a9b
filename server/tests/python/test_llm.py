"""The LLM engine and its APIs, against the real converted SmolLM2-135M-Instruct.

The model directory comes from `make models` (.cache/models/smollm2-135m-instruct-int4;
FERRITE_LLM_MODEL_DIR overrides it). Without it the tests fail under CI=true and are
skipped loudly otherwise.

Clients: the official `openai` SDK for the OpenAI-compatible API, `tritonclient` for
gRPC ModelInfer / ModelStreamInfer, raw HTTP for malformed requests.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import ferrite_testlib as fl

MODEL = "smol"
DEFAULT_DIR = fl.REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct-int4"
# The fp32 variant, for the exactness check of batching (see there).
FP32_DIR = fl.REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct-fp32"
FRANCE = "What is the capital of France?"
# SmolLM2's ChatML, written by hand for the raw-text (gRPC, /v1/completions) prompts.
CHATML_FRANCE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    f"<|im_start|>user\n{FRANCE}<|im_end|>\n<|im_start|>assistant\n"
)


def model_dir() -> Path:
    return checked_dir(Path(os.environ.get("FERRITE_LLM_MODEL_DIR") or DEFAULT_DIR))


def checked_dir(d: Path) -> Path:
    if not (d / "llm.json").is_file():
        fl.missing(f"LLM model directory {d} not found; run `make models`")
    return d


def serving(logs_dir, directory: Path, name: str):
    """The body of a module fixture: an LLM server on `directory`, SIGTERMed at the
    end, whose exit code must be 0 (`yield from serving(...)`)."""
    s = fl.FerriteServer(["--model", f"{MODEL}={checked_dir(directory)}"], logs_dir, name=name)
    s.start()
    yield s
    rc = s.terminate()
    assert rc == 0, f"LLM server exited with {rc} after SIGTERM\n{s.log_tail()}"


@pytest.fixture(scope="module")
def llm_server(logs_dir):
    yield from serving(logs_dir, model_dir(), "llm")


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.http_base}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(llm_server):
    return openai_client(llm_server)


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def stream_chat(client, content, **kw):
    """Streams a chat completion; returns (text, chunks)."""
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], stream=True, **kw)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ------------------------------------------------------------------ OpenAI API


def test_greedy_chat_names_paris(client):
    reply = chat(client, FRANCE, max_tokens=32)
    text = reply.choices[0].message.content
    assert "Paris" in text, text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    usage = reply.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_chat_matches_and_reports_usage(client):
    whole = chat(client, FRANCE, max_tokens=32)
    text, chunks = stream_chat(client, FRANCE, max_tokens=32, stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 3, "tokens arrive as they are generated, not in one piece"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # Without include_usage there is no usage chunk.
    _, plain = stream_chat(client, FRANCE, max_tokens=4)
    assert all(c.usage is None for c in plain)


def test_max_tokens_and_stop_strings(client):
    reply = chat(client, "Count from one to twenty in words.", max_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    full = chat(client, FRANCE, max_tokens=32).choices[0].message.content
    assert "Paris" in full
    stopped = chat(client, FRANCE, max_tokens=32, stop=["Paris"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index("Paris")]
    # The same through streaming: the stop string never reaches the client.
    text, _ = stream_chat(client, FRANCE, max_tokens=32, stop=["Paris"])
    assert text == full[: full.index("Paris")]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(temperature=0.9, top_p=0.95, max_tokens=16)
    a = chat(client, "Tell me a story about a cat.", seed=1234, **kw).choices[0].message.content
    b = chat(client, "Tell me a story about a cat.", seed=1234, **kw).choices[0].message.content
    assert a == b
    penalized = chat(
        client, "Tell me a story about a cat.", presence_penalty=1.5, frequency_penalty=1.0, max_tokens=16
    )
    assert penalized.choices[0].message.content


EIGHT_PROMPTS = [
        FRANCE,
        "Name three primary colors.",
        "What is 2 + 2?",
        "Write a haiku about the sea.",
        "Who wrote Romeo and Juliet?",
        "Give me a synonym for happy.",
        "What is the boiling point of water in Celsius?",
    "Translate 'good morning' into Spanish.",
]


def alone_and_together(client, prompts, max_tokens=20):
    """Each prompt streamed alone, then all at once; returns both lists of texts."""
    alone = [stream_chat(client, p, max_tokens=max_tokens)[0] for p in prompts]

    barrier = threading.Barrier(len(prompts))

    def run(prompt):
        barrier.wait()
        return stream_chat(client, prompt, max_tokens=20)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    return alone, together


def test_eight_concurrent_greedy_streams_match_each_alone(logs_dir):
    """Batching must not change a sequence's tokens. Checked on the fp32 model: its
    kernels compute each row on its own, and left padding changes only the last bits of
    the attention sums. The int4 graph's MatMulNBits (accuracy level 4) quantizes
    activations to int8 and takes another kernel for a single row, so there those last
    bits can change a greedy token (see the next test)."""
    s = fl.FerriteServer(["--model", f"{MODEL}={checked_dir(FP32_DIR)}"], logs_dir, name="llm-fp32")
    s.start()
    try:
        alone, together = alone_and_together(openai_client(s), EIGHT_PROMPTS)
        for prompt, a, t in zip(EIGHT_PROMPTS, alone, together):
            assert t == a, f"{prompt!r}: alone {a!r}, concurrently {t!r}"
        # They really ran together: some decode steps had several sequences.
        samples = fl.parse_metrics(s.metrics_text())
        single = fl.metric_sum(samples, "ferrite_batch_size_bucket", model=MODEL, le="1")
        assert fl.metric_sum(samples, "ferrite_batch_size_count", model=MODEL) > single
    finally:
        assert s.terminate() == 0, s.log_tail()


def test_eight_concurrent_streams_on_int4(client):
    """On int4 every concurrent stream completes with its own answer (not another's)."""
    alone, together = alone_and_together(client, EIGHT_PROMPTS)
    assert "Paris" in together[0]
    for prompt, a, t in zip(EIGHT_PROMPTS, alone, together):
        assert t, prompt
        # The first word comes from the prefill, which runs alone either way; later
        # tokens may drift (int8 activations).
        assert t.split()[:1] == a.split()[:1], f"{prompt!r}: alone {a!r}, concurrently {t!r}"


def test_completions(client, llm_server):
    reply = client.completions.create(model=MODEL, prompt=CHATML_FRANCE, max_tokens=32, temperature=0)
    assert "Paris" in reply.choices[0].text
    assert reply.object == "text_completion" and reply.usage.completion_tokens > 0
    streamed = client.completions.create(model=MODEL, prompt=CHATML_FRANCE, max_tokens=32, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
    # Token ids work as a prompt too.
    tokens = client.completions.create(model=MODEL, prompt=[1, 9690, 198], max_tokens=3, temperature=0)
    assert tokens.usage.prompt_tokens == 3


def test_models_endpoint(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_unknown_model_is_404(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert "nope" in info.value.body["message"]
    assert info.value.body["code"] == "model_not_found"


def test_context_length_is_a_clear_400(client, llm_server):
    import openai

    context = json.loads((model_dir() / "llm.json").read_text())["context_length"]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, "hello " * (context + 100), max_tokens=8)
    assert info.value.status_code == 400
    assert info.value.body["code"] == "context_length_exceeded"
    assert f"maximum context length is {context} tokens" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, FRANCE, max_tokens=context)
    assert "in the prompt" in info.value.body["message"]
    # The server is fine afterwards.
    assert "Paris" in chat(client, FRANCE, max_tokens=32).choices[0].message.content


@pytest.mark.parametrize(
    "body, expected",
    [
        (b"{not json", "invalid request body"),
        (b'{"model": "smol"}', "messages"),
        (b'{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
        (b'{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "n": 17}', "n must be between 1 and 16"),
        (b'{"model": "smol", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
    ],
)
def test_bad_requests_are_400(llm_server, body, expected):
    status, _, data = llm_server.http_request(
        "POST", "/v1/chat/completions", body, headers={"Content-Type": "application/json"}
    )
    assert status == 400, data
    error = json.loads(data)["error"]
    assert expected in error["message"], error
    assert error["type"] == "invalid_request_error"


# --------------------------------------------------------------------- gRPC


def grpc_inputs(prompt: str):
    import tritonclient.grpc as grpcclient

    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return [text]


def test_grpc_model_infer(llm_server, client):
    import tritonclient.grpc as grpcclient

    c = llm_server.grpc_client()
    try:
        assert c.is_model_ready(MODEL)
        meta = c.get_model_metadata(MODEL)
        assert [i.name for i in meta.inputs][0] == "text_input"
        assert [o.name for o in meta.outputs] == ["text_output"]
        config = c.get_model_config(MODEL).config
        assert config.backend == "ferrite_llm"
        assert [i.optional for i in config.input] == [False, True, True, True]
        result = c.infer(
            MODEL,
            grpc_inputs(CHATML_FRANCE),
            outputs=[grpcclient.InferRequestedOutput("text_output")],
            parameters={"max_tokens": 32, "temperature": 0},
            client_timeout=300,
        )
        text = result.as_numpy("text_output")[0].decode()
        assert "Paris" in text
        params = result.get_response().parameters
        assert params["finish_reason"].string_param == "stop"
        assert params["completion_tokens"].int64_param > 0
        same = client.completions.create(model=MODEL, prompt=CHATML_FRANCE, max_tokens=32, temperature=0)
        assert same.choices[0].text == text
        # Bad requests are INVALID_ARGUMENT.
        with fl.expect_grpc_error("INVALID_ARGUMENT", "max_tokens"):
            c.infer(MODEL, grpc_inputs("x"), parameters={"max_tokens": "many"}, client_timeout=60)
        with fl.expect_grpc_error("INVALID_ARGUMENT", "maximum context length"):
            c.infer(MODEL, grpc_inputs("x"), parameters={"max_tokens": 10**6}, client_timeout=60)
    finally:
        c.close()


def test_rest_and_grpc_describe_the_llm_alike(llm_server, client):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # statistics worth comparing
    models, differences = fl.description_differences(llm_server)
    assert models == [MODEL]
    assert not differences, "\n".join(differences)
    config = llm_server.http_client().get_model_config(MODEL)
    assert [i["optional"] for i in config["input"]] == [False, True, True, True]
    assert config["parameters"]["decoupled"] == {"string_value": "true"}


def test_grpc_stream_infer_sends_tokens_as_they_come(llm_server):
    c = llm_server.grpc_client()
    responses: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        c.async_stream_infer(
            MODEL, grpc_inputs(CHATML_FRANCE), request_id="s1", parameters={"max_tokens": 32, "temperature": 0}
        )
        pieces = []
        while True:
            result, error = responses.get(timeout=300)
            assert error is None, error
            pieces.append(result.as_numpy("text_output")[0].decode())
            params = result.get_response().parameters
            assert result.get_response().id == "s1"
            if params["triton_final_response"].bool_param:
                assert params["finish_reason"].string_param == "stop"
                break
        assert len(pieces) >= 3
        assert "Paris" in "".join(pieces)
        unary = c.infer(MODEL, grpc_inputs(CHATML_FRANCE), parameters={"max_tokens": 32, "temperature": 0})
        assert "".join(pieces) == unary.as_numpy("text_output")[0].decode()
        # stream=false: one response.
        c.async_stream_infer(
            MODEL, grpc_inputs(CHATML_FRANCE), parameters={"max_tokens": 32, "temperature": 0, "stream": False}
        )
        result, error = responses.get(timeout=300)
        assert error is None and result.as_numpy("text_output")[0].decode() == "".join(pieces)
    finally:
        c.stop_stream()
        c.close()


# ------------------------------------------------------------ slots, metrics


def running(server) -> float:
    return fl.metric_sum(fl.parse_metrics(server.metrics_text()), "ferrite_llm_running_sequences", model=MODEL)


def test_cancelled_stream_frees_its_slot_and_full_queue_is_429(server_factory):
    """One decode slot, one waiting place: a third request is refused with 429; a
    cancelled stream leaves the batch at once, so the next request is served."""
    import openai

    s = server_factory(["--model", f"{MODEL}={model_dir()}", "--max-batch-size", "1", "--max-queue-size", "1"])
    c = openai_client(s)
    long_story = dict(max_tokens=4000, temperature=0.8, seed=1)
    first = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}], stream=True, **long_story
    )
    next(iter(first))  # generating: the one slot is taken
    fl.wait_until(lambda: running(s) == 1, what="one running sequence")

    # The second waits for the slot; the third finds the queue full.
    waiting = ThreadPoolExecutor(1).submit(chat, c, FRANCE, max_tokens=32)
    fl.wait_until(
        lambda: fl.metric_sum(fl.parse_metrics(s.metrics_text()), "ferrite_llm_waiting_sequences", model=MODEL) == 1,
        what="one waiting sequence",
    )
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, "hi", max_tokens=4)
    assert info.value.status_code == 429 and "queue is full" in info.value.body["message"]
    samples = fl.parse_metrics(s.metrics_text())
    assert fl.metric_sum(samples, "ferrite_queue_depth", model=MODEL) == 1
    assert fl.metric_sum(samples, "ferrite_inflight_requests", model=MODEL) == 1

    # Cancel the long stream: the waiting request gets the slot and finishes.
    started = time.monotonic()
    first.close()
    reply = waiting.result(timeout=120)
    assert "Paris" in reply.choices[0].message.content
    assert time.monotonic() - started < 60
    fl.wait_until(lambda: running(s) == 0, what="no running sequence")
    samples = fl.parse_metrics(s.metrics_text())
    assert fl.metric_sum(samples, "ferrite_requests_total", model=MODEL, outcome="cancelled") >= 1
    assert fl.metric_sum(samples, "ferrite_requests_total", model=MODEL, outcome="queue_full") == 1


def test_generation_metrics(llm_server, client):
    chat(client, FRANCE, max_tokens=8)
    samples = fl.parse_metrics(llm_server.metrics_text())
    assert fl.metric_sum(samples, "ferrite_llm_time_to_first_token_seconds_count", model=MODEL) > 0
    assert fl.metric_sum(samples, "ferrite_llm_inter_token_latency_seconds_count", model=MODEL) > 0
    assert fl.metric_sum(samples, "ferrite_llm_generated_tokens_total", model=MODEL) > 0
    assert fl.metric_sum(samples, "ferrite_llm_prompt_tokens_total", model=MODEL) > 0
    assert fl.metric_find(samples, "ferrite_llm_waiting_sequences", model=MODEL)
    assert fl.metric_find(samples, "ferrite_queue_depth", model=MODEL)
    assert fl.metric_sum(samples, "ferrite_requests_total", model=MODEL, outcome="success") > 0


# ------------------------------------------------------- repository, health


def test_llm_in_a_model_repository(tmp_path, server_factory):
    """An LLM version directory in a repository loads next to tensor models, and shows
    in the index, readiness, per-model gRPC health and the KServe v2 REST API."""
    import grpc
    import tritonclient.http as httpclient
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    version = tmp_path / "repo" / "chat" / "1"
    version.mkdir(parents=True)
    for f in model_dir().iterdir():
        if not f.name.startswith("."):
            (version / f.name).symlink_to(f)
    fl.make_test_models.build_repository(tmp_path / "repo")
    s = server_factory(["--model-repository", str(tmp_path / "repo")])
    g = s.grpc_client()
    try:
        index = {m["name"]: m["state"] for m in g.get_model_repository_index(as_json=True)["models"]}
        assert index["chat"] == "READY" and index["add_sub"] == "READY"
        assert g.is_model_ready("chat", "1")
        with grpc.insecure_channel(s.grpc_url) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="chat"), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        # KServe v2 REST infer takes the same text_input / parameters.
        h = s.http_client()
        text = httpclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([CHATML_FRANCE.encode()], dtype=np.object_))
        result = h.infer("chat", [text], parameters={"max_tokens": 32, "temperature": 0})
        assert "Paris" in result.as_numpy("text_output")[0].decode()
        h.close()
        # The OpenAI API lists only language models.
        assert [m.id for m in openai_client(s).models.list().data] == ["chat"]
        status, _, body = s.http_request(
            "POST", "/v1/chat/completions", json.dumps({"model": "add_sub", "messages": []}).encode()
        )
        assert status == 404 and "not a language model" in json.loads(body)["error"]["message"]
    finally:
        g.close()
