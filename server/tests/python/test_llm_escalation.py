"""Micro -> macro escalation (docs/escalation.md), against the real SmolLM2 int4 model
as the micro model and a small OpenAI-compatible stand-in as the target, written here:
it records every request and answers a fixed text, whole or streamed, and can be made
slow or failing.

Two servers: one with a model repository whose models each carry their own
`ferrite.json` `escalation` settings (one per behaviour: confidence, length and schema,
budget, a failing target, queue full, shadow; each model loads its own engine, so they
are few), and one serving the model with `--escalation-file` (forced sides, streaming,
OIP gRPC). The model directory comes from
`make models` (see test_llm.py).
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import ferrite_testlib as fl
from test_llm import CHATML_FRANCE, FRANCE, model_dir

MACRO = "macro-model"
MACRO_TEXT = "MACRO ANSWER: Paris."
# Small KV budgets: one server holds several engines.
KV_BUDGET = str(64 << 20)


class StandIn:
    """An OpenAI-compatible target on 127.0.0.1: `/v1/chat/completions` and
    `/v1/completions`, whole or streamed (SSE, with usage when asked). `delay` seconds
    before answering; `status` other than 200 answers that status."""

    def __init__(self, delay: float = 0.0, status: int = 200):
        self.delay, self.status = delay, status
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def end_headers(self):
                # One request per connection: a closed stand-in refuses the next one.
                self.send_header("connection", "close")
                self.close_connection = True
                super().end_headers()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with stand_in.lock:
                    stand_in.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                time.sleep(stand_in.delay)
                if stand_in.status != 200:
                    data = b'{"error": {"message": "overloaded"}}'
                    self.send_response(stand_in.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                chat = self.path.endswith("/chat/completions")
                n = body.get("n", 1)
                if body.get("stream"):
                    self.stream(chat, n, body)
                else:
                    choices = [
                        {"index": i, "message": {"role": "assistant", "content": MACRO_TEXT}, "finish_reason": "stop"}
                        if chat
                        else {"index": i, "text": MACRO_TEXT, "finish_reason": "stop"}
                        for i in range(n)
                    ]
                    data = json.dumps(
                        {"id": "x", "object": "chat.completion", "model": body["model"], "choices": choices,
                         "usage": {"prompt_tokens": 7, "completion_tokens": 5 * n, "total_tokens": 7 + 5 * n}}
                    ).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def stream(self, chat, n, body):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()

                def send(value):
                    self.wfile.write(f"data: {json.dumps(value)}\n\n".encode())
                    self.wfile.flush()

                half = len(MACRO_TEXT) // 2
                for i in range(n):
                    for piece in (MACRO_TEXT[:half], MACRO_TEXT[half:]):
                        choice = {"index": i, "delta": {"content": piece}} if chat else {"index": i, "text": piece}
                        send({"choices": [{**choice, "finish_reason": None}]})
                    done = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
                    send({"choices": [{**done, "finish_reason": "stop"}]})
                if body.get("stream_options", {}).get("include_usage"):
                    send({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def last(self) -> dict:
        with self.lock:
            return self.requests[-1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def targets():
    """`good` answers; `flaky` is made slow, failing, then closed by the tests."""
    good, flaky = StandIn(), StandIn()
    yield {"good": good.url, "flaky": flaky.url, "stand_ins": {"good": good, "flaky": flaky}}
    good.close()
    flaky.close()


def settings(url, **fields):
    return {"target": {"url": url, "model": MACRO}, **fields}


# Each model of the repository server: its escalation settings (and other settings).
def repository_models(targets, shadow_log):
    good = targets["good"]
    return {
        "all": {"escalation": settings(good, confidence={"quantile": 0.1, "threshold": 0}, decideAfterTokens=4)},
        "none": {
            "escalation": settings(
                good, confidence={"threshold": -100}, onLengthCutoff=True, onSchemaFailure=False,
                pricing={"inputPerMillionTokens": 10, "outputPerMillionTokens": 30},
            )
        },
        "half": {"escalation": settings(good, confidence={"threshold": 0}, maxEscalationFraction=0.5)},
        "flaky": {
            "escalation": settings(targets["flaky"], confidence={"threshold": 0}, decideAfterTokens=4, timeoutSeconds=1)
        },
        # Also the schema signal (no length signal, no confidence).
        "queue": {
            "max_batch_size": 1,
            "max_queue_size": 1,
            "escalation": settings(good, onQueueFull=True, onSchemaFailure=True, onLengthCutoff=False),
        },
        "shadow": {"escalation": settings(good, mode="shadow", confidence={"threshold": -1}, shadowLog=str(shadow_log))},
    }


@pytest.fixture(scope="module")
def shadow_log(tmp_path_factory):
    return tmp_path_factory.mktemp("shadow") / "logs" / "shadow.jsonl"


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory, logs_dir, targets, shadow_log):
    root = tmp_path_factory.mktemp("escalation-repo")
    source = model_dir()
    for name, fields in repository_models(targets, shadow_log).items():
        (root / name).mkdir()
        (root / name / "1").symlink_to(source, target_is_directory=True)
        (root / name / "ferrite.json").write_text(json.dumps(fields))
    s = fl.FerriteServer(["--model-repository", str(root), "--llm-kv-budget-bytes", KV_BUDGET], logs_dir,
                         name="escalation-repo")
    s.start()
    yield s
    rc = s.terminate()
    assert rc == 0, f"server exited with {rc} after SIGTERM\n{s.log_tail()}"


@pytest.fixture(scope="module")
def file_server(tmp_path_factory, logs_dir, targets):
    """`--escalation-file`: nothing escalates unless forced; streams decide after 4 tokens."""
    path = tmp_path_factory.mktemp("escalation-file") / "escalation.json"
    path.write_text(json.dumps(settings(targets["good"], confidence={"threshold": -100}, decideAfterTokens=4)))
    s = fl.FerriteServer(
        ["--model", f"smol={model_dir()}", "--escalation-file", str(path), "--llm-kv-budget-bytes", KV_BUDGET],
        logs_dir, name="escalation-file",
    )
    s.start()
    yield s
    rc = s.terminate()
    assert rc == 0, f"server exited with {rc} after SIGTERM\n{s.log_tail()}"


def post(server, path, body, headers=None):
    """POSTs JSON; returns (status, lower-cased headers, body bytes)."""
    status, hdrs, data = server.http_request(
        "POST", path, json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})}, timeout=120
    )
    return status, {k.lower(): v for k, v in hdrs.items()}, data


def chat(server, model, content=FRANCE, headers=None, **kw):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0,
            **kw}
    status, hdrs, data = post(server, "/v1/chat/completions", body, headers)
    return status, hdrs, json.loads(data) if not kw.get("stream") else sse_text(data)


def sse_text(data: bytes):
    """The text of a streamed chat answer and its chunks."""
    chunks = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert data.decode().rstrip().endswith("data: [DONE]")
    return text, chunks


def content(reply):
    return reply["choices"][0]["message"]["content"]


def metrics(server):
    return fl.parse_metrics(server.metrics_text())


# ------------------------------------------------------------ forced sides, file settings


def test_forced_always_goes_to_the_target_with_the_original_request(file_server, targets):
    good = targets["stand_ins"]["good"]
    before = good.count()
    status, hdrs, reply = chat(file_server, "smol", headers={"x-ferrite-escalate": "always"}, max_tokens=9)
    assert status == 200, reply
    assert content(reply) == MACRO_TEXT
    assert reply["model"] == "smol", "the client asked for smol: the reply says so"
    assert hdrs["x-ferrite-served-by"] == MACRO and hdrs["x-ferrite-escalation"] == "forced"
    assert "x-ferrite-confidence" not in hdrs and "x-ferrite-fallback" not in hdrs
    assert good.count() == before + 1
    sent = good.last()
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["model"] == MACRO and sent["body"]["max_tokens"] == 9
    assert sent["body"]["messages"] == [{"role": "user", "content": FRANCE}]
    assert "x-ferrite-escalate" not in {k.lower() for k in sent["headers"]}


def test_forced_never_and_a_bad_value(file_server, targets):
    good = targets["stand_ins"]["good"]
    before = good.count()
    status, hdrs, reply = chat(file_server, "smol", headers={"x-ferrite-escalate": "never"})
    assert status == 200 and "Paris" in content(reply)
    assert hdrs["x-ferrite-served-by"] == "smol" and "x-ferrite-escalation" not in hdrs
    status, _, reply = chat(file_server, "smol", headers={"x-ferrite-escalate": "sometimes"})
    assert status == 400 and "x-ferrite-escalate" in reply["error"]["message"]
    assert good.count() == before


def test_confident_answers_stay_local_with_their_confidence(file_server):
    status, hdrs, reply = chat(file_server, "smol")
    assert status == 200 and "Paris" in content(reply)
    assert hdrs["x-ferrite-served-by"] == "smol"
    confidence = float(hdrs["x-ferrite-confidence"])
    assert -100 < confidence <= 0 and len(hdrs["x-ferrite-confidence"].split(".")[1]) == 4
    # The cascade computes log-probabilities; the client did not ask for them.
    assert reply["choices"][0]["logprobs"] is None


def test_streaming_held_then_flushed_or_replaced(file_server, targets):
    whole = content(chat(file_server, "smol")[2])
    status, hdrs, (text, chunks) = chat(file_server, "smol", stream=True)
    assert status == 200 and text == whole, "the held tokens are replayed, then the rest streams"
    assert hdrs["x-ferrite-served-by"] == "smol" and "x-ferrite-confidence" in hdrs
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    status, hdrs, (text, chunks) = chat(file_server, "smol", stream=True, headers={"x-ferrite-escalate": "always"},
                                        stream_options={"include_usage": True})
    assert status == 200 and text == MACRO_TEXT, "only the target's answer"
    assert hdrs["x-ferrite-served-by"] == MACRO
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]] == ["stop"]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert targets["stand_ins"]["good"].last()["body"]["stream"] is True


def test_completions_and_n_choices_escalate_together(file_server, targets):
    body = {"model": "smol", "prompt": CHATML_FRANCE, "max_tokens": 8, "n": 2, "temperature": 0.7, "seed": 3}
    status, hdrs, data = post(file_server, "/v1/completions", body, {"x-ferrite-escalate": "always"})
    reply = json.loads(data)
    assert status == 200 and [c["text"] for c in reply["choices"]] == [MACRO_TEXT, MACRO_TEXT]
    assert reply["usage"]["completion_tokens"] == 10
    sent = targets["stand_ins"]["good"].last()
    assert sent["path"] == "/v1/completions" and sent["body"]["n"] == 2 and sent["body"]["prompt"] == CHATML_FRANCE


def grpc_inputs(prompt):
    import tritonclient.grpc as grpcclient

    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return [text]


def test_oip_grpc_parameters(file_server, targets):
    from tritonclient.utils import InferenceServerException

    c = file_server.grpc_client()
    try:
        result = c.infer("smol", grpc_inputs(CHATML_FRANCE),
                         parameters={"max_tokens": 8, "temperature": 0, "x-ferrite-escalate": "always"},
                         client_timeout=120)
        assert result.as_numpy("text_output")[0].decode() == MACRO_TEXT
        params = result.get_response().parameters
        assert params["x-ferrite-served-by"].string_param == MACRO
        assert params["x-ferrite-escalation"].string_param == "forced"
        sent = targets["stand_ins"]["good"].last()
        assert sent["path"] == "/v1/completions"
        assert sent["body"]["prompt"] == CHATML_FRANCE and sent["body"]["max_tokens"] == 8
        result = c.infer("smol", grpc_inputs(CHATML_FRANCE), parameters={"max_tokens": 8, "temperature": 0},
                         client_timeout=120)
        assert "Paris" in result.as_numpy("text_output")[0].decode()
        params = result.get_response().parameters
        assert params["x-ferrite-served-by"].string_param == "smol"
        assert float(params["x-ferrite-confidence"].string_param) <= 0
        assert "logprobs" not in params, "computed for the cascade, not asked for"
        with pytest.raises(InferenceServerException) as info:
            c.infer("smol", grpc_inputs("x"), parameters={"x-ferrite-escalate": "maybe"}, client_timeout=60)
        assert "INVALID_ARGUMENT" in str(info.value.status()) and "x-ferrite-escalate" in info.value.message()
    finally:
        c.close()


# ------------------------------------------------------------------ signals, per model


def test_no_target_up_gauge_before_a_target_call(repo_server):
    samples = metrics(repo_server)
    assert not fl.metric_find(samples, "ferrite_escalation_target_up")
    assert fl.metric_find(samples, "ferrite_cascade_tokens_total", model="all", side="micro"), "families exist"


def test_confidence_threshold_zero_escalates_and_minus_100_does_not(repo_server):
    status, hdrs, reply = chat(repo_server, "all")
    assert status == 200 and content(reply) == MACRO_TEXT
    assert hdrs["x-ferrite-escalation"] == "confidence" and hdrs["x-ferrite-served-by"] == MACRO
    status, hdrs, reply = chat(repo_server, "none")
    assert status == 200 and "Paris" in content(reply)
    assert hdrs["x-ferrite-served-by"] == "none" and "x-ferrite-escalation" not in hdrs
    # Streaming: decided after 4 held tokens; the client sees the target's answer only.
    status, hdrs, (text, _) = chat(repo_server, "all", stream=True, max_tokens=32)
    assert status == 200 and text == MACRO_TEXT and hdrs["x-ferrite-escalation"] == "confidence"


def test_length_cutoff(repo_server):
    status, hdrs, reply = chat(repo_server, "none", content="Count from one to twenty in words.", max_tokens=3)
    assert status == 200 and content(reply) == MACRO_TEXT
    assert hdrs["x-ferrite-escalation"] == "length"


def test_schema_failure(repo_server):
    fmt = {"type": "json_object"}
    status, hdrs, reply = chat(repo_server, "queue", content="Give me a JSON object about Paris.", max_tokens=3,
                               response_format=fmt)
    assert status == 200 and content(reply) == MACRO_TEXT, reply
    assert hdrs["x-ferrite-escalation"] == "schema"


def test_budget_fraction(repo_server):
    # An uncertain start: every answer's confidence is below 0, so each wants to escalate.
    served = [chat(repo_server, "half", content="Tell me a story.", max_tokens=4)[1]["x-ferrite-served-by"]
              for _ in range(6)]
    assert served.count(MACRO) == 3 and served.count("half") == 3, served


def test_failing_targets_fall_back_to_the_micro_answer(repo_server, targets):
    flaky = targets["stand_ins"]["flaky"]
    status, hdrs, reply = chat(repo_server, "flaky")
    assert status == 200 and content(reply) == MACRO_TEXT, "answering, at first"
    # Slow: timeoutSeconds 1, the target takes 3.
    flaky.delay = 3.0
    started = time.monotonic()
    status, hdrs, reply = chat(repo_server, "flaky")
    assert status == 200 and "Paris" in content(reply)
    assert hdrs["x-ferrite-served-by"] == "flaky" and hdrs["x-ferrite-fallback"] == "timeout"
    assert hdrs["x-ferrite-escalation"] == "confidence"
    assert time.monotonic() - started < 3
    micro = content(reply)
    # An error status.
    flaky.delay, flaky.status = 0.0, 500
    status, hdrs, reply = chat(repo_server, "flaky")
    assert status == 200 and content(reply) == micro and hdrs["x-ferrite-fallback"] == "error"
    # Gone: nothing listens.
    flaky.close()
    started = time.monotonic()
    status, hdrs, reply = chat(repo_server, "flaky")
    assert status == 200 and content(reply) == micro and hdrs["x-ferrite-fallback"] == "unreachable"
    assert time.monotonic() - started < 10
    # Streaming: the target fails before its first byte; the held answer is replayed, then continued.
    status, hdrs, (text, _) = chat(repo_server, "flaky", stream=True)
    assert status == 200 and text == micro and hdrs["x-ferrite-fallback"] == "unreachable"


def test_queue_full_is_forwarded(repo_server, targets):
    good = targets["stand_ins"]["good"]
    before = good.count()

    def one(i):
        return chat(repo_server, "queue", content=f"Tell me a story number {i}.", max_tokens=24)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert [r[0] for r in results] == [200] * 8, "0 failed"
    forwarded = [r for r in results if r[1]["x-ferrite-served-by"] == MACRO]
    assert forwarded and all(r[1]["x-ferrite-escalation"] == "queue_full" for r in forwarded)
    assert good.count() - before == len(forwarded)


def test_shadow_mode_serves_micro_and_records_both(repo_server, shadow_log):
    replies = [chat(repo_server, "shadow", content=q, max_tokens=8) for q in (FRANCE, "What is 2 + 2?")]
    for status, hdrs, reply in replies:
        assert status == 200 and hdrs["x-ferrite-served-by"] == "shadow"
        assert content(reply) != MACRO_TEXT
    fl.wait_until(lambda: shadow_log.is_file() and len(shadow_log.read_text().splitlines()) >= 2,
                  what="two shadow records")
    records = [json.loads(line) for line in shadow_log.read_text().splitlines()]
    texts = {r["micro"]["text"] for r in records}
    assert {content(r[2]) for r in replies} <= texts
    for record in records:
        assert record["model"] == "shadow" and record["kind"] == "chat"
        assert record["macro"]["text"] == MACRO_TEXT and record["macro"]["seconds"] >= 0
        # One entry per generated token, an end-of-sequence token excepted.
        lps, tokens = record["logprobs"], record["micro"]["completion_tokens"]
        assert len(lps) in (tokens, tokens - 1) and lps and all(lp <= 0 for lp in lps)
        # The nearest-rank (lower) 0.1-quantile.
        assert record["confidence"] == pytest.approx(sorted(lps)[math.ceil(0.1 * len(lps)) - 1])
        assert record["prompt_tokens"] > 10 and record["time"].endswith("Z")


def test_metrics(repo_server):
    chat(repo_server, "all")
    chat(repo_server, "none")
    samples = metrics(repo_server)
    m = lambda name, **labels: fl.metric_sum(samples, name, **labels)  # noqa: E731
    assert m("ferrite_escalations_total", model="all", reason="confidence") >= 1
    assert m("ferrite_cascade_decisions_total", model="all", outcome="escalated") >= 1
    assert m("ferrite_cascade_decisions_total", model="none", outcome="local") >= 1
    assert m("ferrite_cascade_decisions_total", model="flaky", outcome="fallback") >= 4
    assert m("ferrite_escalation_confidence_count", model="none") >= 1
    assert m("ferrite_cascade_tokens_total", model="none", side="micro") > 0
    assert m("ferrite_cascade_tokens_total", model="all", side="macro") >= 5
    assert m("ferrite_escalation_target_duration_seconds_count", model="all") >= 1
    for kind in ("timeout", "error", "unreachable"):
        assert m("ferrite_escalation_target_errors_total", model="flaky", kind=kind) >= 1, kind
    assert m("ferrite_escalation_spend_avoided_dollars_total", model="none") > 0
    assert fl.metric_find(samples, "ferrite_escalation_target_up", model="all") == [({"model": "all"}, 1.0)]
    assert fl.metric_find(samples, "ferrite_escalation_target_up", model="flaky") == [({"model": "flaky"}, 0.0)]

