"""Log-probabilities, `n` > 1 and `seed` in the OpenAI API (and `logprobs` over gRPC).

Against the fp32 SmolLM2 model: its rows are batch-invariant (docs/llm.md), so greedy
tokens and seeded draws do not depend on what else runs, and its log-probabilities can
be checked against onnxruntime + numpy (models/llm_reference.py) on the same graph.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import ferrite_testlib as fl
from test_llm import CHATML_FRANCE, FP32_DIR, FRANCE, MODEL, checked_dir, grpc_inputs, openai_client, serving

STORY = "Tell me a short story about a cat."


@pytest.fixture(scope="module")
def fp32_server(logs_dir):
    yield from serving(logs_dir, FP32_DIR, "llm-logprobs")


@pytest.fixture(scope="module")
def client(fp32_server):
    return openai_client(fp32_server)


def chat(client, content=FRANCE, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def check_entry(token, logprob, top, greedy):
    """One token's entry: log-probabilities <= 0, alternatives sorted, their mass <= 1;
    greedy: the chosen token is the most likely one."""
    assert logprob <= 0.0
    values = [t[1] for t in top]
    assert all(v <= 0.0 for v in values), values
    assert values == sorted(values, reverse=True), values
    assert sum(math.exp(v) for v in values) <= 1 + 1e-4, values
    # The sampled token is never more likely than the best alternative.
    if top:
        assert logprob <= values[0] + 1e-6
    if greedy and top:
        assert top[0][0] == token and top[0][1] == pytest.approx(logprob, abs=1e-6), (token, top[:2])


def test_chat_logprobs_through_the_openai_sdk(client):
    reply = chat(client, logprobs=True, top_logprobs=5, max_tokens=16)
    choice = reply.choices[0]
    content = choice.logprobs.content
    # One entry per generated token (no stop strings here; an end token has none).
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 5
        top = [(t.token, t.logprob) for t in entry.top_logprobs]
        check_entry(entry.token, entry.logprob, top, greedy=True)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    # The tokens' bytes spell the answer.
    assert b"".join(bytes(e.bytes) for e in content).decode() == choice.message.content
    # The first answer token of this chat is confident but not certain.
    assert -5 < content[0].logprob < 0
    # logprobs alone: no alternatives; not asked: null.
    bare = chat(client, logprobs=True, max_tokens=4).choices[0].logprobs.content
    assert [e.top_logprobs for e in bare] == [[]] * len(bare)
    assert [e.token for e in bare] == [e.token for e in content[: len(bare)]]
    assert chat(client, max_tokens=4).choices[0].logprobs is None


def test_sampled_tokens_are_reported_even_outside_the_top_list(client):
    """At temperature 2 the draws leave the top-1: the sampled token's log-probability is
    still there, from the model's own distribution (temperature does not change it)."""
    reply = chat(client, STORY, logprobs=True, top_logprobs=1, temperature=2.0, seed=7, max_tokens=24)
    content = reply.choices[0].logprobs.content
    outside = [e for e in content if e.token != e.top_logprobs[0].token]
    assert outside, "some draw at temperature 2 is not the most likely token"
    for e in content:
        check_entry(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs], greedy=False)
    for e in outside:
        assert e.logprob < e.top_logprobs[0].logprob


def stream_entries(client, **kw):
    chunks = list(chat(client, stream=True, **kw))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, entries


def test_streamed_logprobs_equal_the_whole_answer(client):
    kw = dict(logprobs=True, top_logprobs=3, max_tokens=16)
    whole = chat(client, **kw).choices[0]
    text, entries = stream_entries(client, **kw)
    assert text == whole.message.content
    assert [e.token for e in entries] == [e.token for e in whole.logprobs.content]
    for s, w in zip(entries, whole.logprobs.content):
        assert s.logprob == pytest.approx(w.logprob, abs=1e-5)
        assert [t.token for t in s.top_logprobs] == [t.token for t in w.top_logprobs]
    # With a stop string: every generated token keeps its entry, the text stops before it.
    stopped = chat(client, stop=["Paris"], **kw).choices[0]
    s_text, s_entries = stream_entries(client, stop=["Paris"], **kw)
    assert s_text == stopped.message.content and "Paris" not in s_text
    assert [e.token for e in s_entries] == [e.token for e in stopped.logprobs.content]


def test_completions_logprobs_shape(client, fp32_server):
    reply = client.completions.create(model=MODEL, prompt=CHATML_FRANCE, max_tokens=12, temperature=0, logprobs=3)
    choice = reply.choices[0]
    lp = choice.logprobs
    n = len(lp.tokens)
    assert n == reply.usage.completion_tokens
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(n)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # The 3 alternatives, plus the sampled token when it is not one of them.
        assert token in top and top[token] == logprob
        assert len(top) in (3, 4)
        ranked = sorted(top.items(), key=lambda kv: -kv[1])
        check_entry(token, logprob, ranked, greedy=True)
    # Streamed: the same entries, offsets continuing across chunks.
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=CHATML_FRANCE, max_tokens=12, temperature=0, logprobs=3, stream=True
        )
    )
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    # logprobs=0: only the sampled token in each dictionary.
    zero = client.completions.create(model=MODEL, prompt=CHATML_FRANCE, max_tokens=4, temperature=0, logprobs=0)
    assert [list(t) for t in zero.choices[0].logprobs.top_logprobs] == [[t] for t in zero.choices[0].logprobs.tokens]


def log_softmax(row):
    row = row.astype(np.float64)
    m = row.max()
    return row - (m + np.log(np.exp(row - m).sum()))


def test_logprobs_match_the_onnxruntime_reference(client):
    """The server's numbers are the log-softmax of the fp32 model's raw logits."""
    sys.path.insert(0, str(fl.REPO_ROOT / "models"))
    from llm_reference import OnnxLlm

    ref = OnnxLlm(str(checked_dir(FP32_DIR)), threads=1)
    prompt = ref.encode(CHATML_FRANCE)
    steps = 6
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=steps, temperature=0, logprobs=5)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == steps
    generated = ref.greedy([prompt], steps)[0]
    logits = ref.teacher_forced(prompt, generated)
    for i, token in enumerate(generated):
        want = log_softmax(logits[i])
        assert lp.tokens[i] == ref.decode([token])
        assert lp.token_logprobs[i] == pytest.approx(want[token], abs=1e-3)
        best = np.argsort(-want)[:5]
        got = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert got == pytest.approx([want[b] for b in best], abs=1e-3)
        assert set(lp.top_logprobs[i]) == {ref.decode([int(b)]) for b in best}


def texts(reply):
    assert [c.index for c in reply.choices] == list(range(len(reply.choices)))
    return [c.message.content for c in reply.choices]


def test_n_seeded_choices_are_reproducible(client):
    kw = dict(n=3, temperature=1.0, seed=42, max_tokens=12, logprobs=True)
    first = chat(client, STORY, **kw)
    again = chat(client, STORY, **kw)
    assert texts(first) == texts(again)
    assert len(set(texts(first))) >= 2, texts(first)
    # Usage: the prompt once, every choice's tokens.
    single = chat(client, STORY, temperature=1.0, seed=42, max_tokens=12)
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)
    # Choice i is seed + i.
    assert texts(first)[0] == single.choices[0].message.content
    assert texts(first)[2] == chat(client, STORY, temperature=1.0, seed=44, max_tokens=12).choices[0].message.content

    # The same while other requests share the batch.
    stop = threading.Event()

    def noise():
        while not stop.is_set():
            chat(client, "Write a poem about the sea.", temperature=0.8, max_tokens=12)

    with ThreadPoolExecutor(3) as pool:
        noisy = [pool.submit(noise) for _ in range(2)]
        try:
            busy = chat(client, STORY, **kw)
        finally:
            stop.set()
        for f in noisy:
            f.result()
    assert texts(busy) == texts(first)


def test_n_greedy_choices_are_identical(client):
    reply = chat(client, n=3, max_tokens=12)
    assert len(reply.choices) == 3
    assert len(set(texts(reply))) == 1 and "Paris" in texts(reply)[0]
    assert reply.usage.completion_tokens == 3 * chat(client, max_tokens=12).usage.completion_tokens


def test_n_streams_interleave_by_index(client):
    whole = chat(client, STORY, n=2, temperature=1.0, seed=3, max_tokens=12)
    chunks = list(
        chat(client, STORY, n=2, temperature=1.0, seed=3, max_tokens=12, stream=True,
             stream_options={"include_usage": True})
    )
    pieces = {0: "", 1: ""}
    finishes = {0: [], 1: []}
    roles = []
    for c in chunks[:-1]:
        (choice,) = c.choices
        pieces[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index].append(choice.finish_reason)
        if choice.delta.role:
            roles.append(choice.index)
    assert sorted(roles) == [0, 1]
    assert [pieces[0], pieces[1]] == texts(whole)
    assert [len(finishes[0]), len(finishes[1])] == [1, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # Completions too.
    done = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=6, temperature=1.0, seed=3)
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", n=2, max_tokens=6, temperature=1.0, seed=3, stream=True
        )
    )
    by_index = {0: "", 1: ""}
    for c in streamed:
        by_index[c.choices[0].index] += c.choices[0].text
    assert [by_index[0], by_index[1]] == [c.text for c in done.choices]


@pytest.mark.parametrize(
    "path, fields, expected",
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs requires logprobs"),
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs must be a boolean"),
        ("/v1/chat/completions", {"n": 0}, "n must be between 1 and 16"),
        ("/v1/chat/completions", {"n": 17}, "n must be between 1 and 16"),
        ("/v1/completions", {"logprobs": 6}, "logprobs must be between 0 and 5"),
        ("/v1/completions", {"logprobs": True}, "logprobs must be an integer"),
        ("/v1/completions", {"n": 99}, "n must be between 1 and 16"),
    ],
)
def test_bad_values_are_400(fp32_server, path, fields, expected):
    body = {"model": MODEL, "max_tokens": 2, **fields}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    status, _, data = fp32_server.http_request(
        "POST", path, json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    assert status == 400, data
    error = json.loads(data)["error"]
    assert expected in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_grpc_logprobs_parameter(fp32_server, client):
    import tritonclient.grpc as grpcclient

    c = fp32_server.grpc_client()
    try:
        result = c.infer(
            MODEL,
            grpc_inputs(CHATML_FRANCE),
            outputs=[grpcclient.InferRequestedOutput("text_output")],
            parameters={"max_tokens": 8, "temperature": 0, "logprobs": 2},
            client_timeout=300,
        )
        params = result.get_response().parameters
        entries = json.loads(params["logprobs"].string_param)
        assert len(entries) == params["completion_tokens"].int64_param
        same = client.completions.create(model=MODEL, prompt=CHATML_FRANCE, max_tokens=8, temperature=0, logprobs=2)
        assert [e["token"] for e in entries] == same.choices[0].logprobs.tokens
        for e, want in zip(entries, same.choices[0].logprobs.token_logprobs):
            assert e["logprob"] == pytest.approx(want, abs=1e-5)
            assert len(e["top_logprobs"]) == 2
        # The KServe v2 REST endpoint takes and answers the same.
        body = {
            "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [CHATML_FRANCE]}],
            "parameters": {"max_tokens": 8, "temperature": 0, "logprobs": 2},
        }
        status, _, data = fp32_server.http_request(
            "POST", f"/v2/models/{MODEL}/infer", json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        assert status == 200, data
        answer = json.loads(data)
        assert answer["parameters"]["completion_tokens"] == len(entries)
        assert answer["parameters"]["finish_reason"] in ("stop", "length")
        rest = json.loads(answer["parameters"]["logprobs"])
        assert [e["token"] for e in rest] == [e["token"] for e in entries]
        # Not asked: no parameter.
        plain = c.infer(MODEL, grpc_inputs("Hi"), parameters={"max_tokens": 2}, client_timeout=300)
        assert "logprobs" not in plain.get_response().parameters
        with fl.expect_grpc_error("INVALID_ARGUMENT", "logprobs"):
            c.infer(MODEL, grpc_inputs("x"), parameters={"logprobs": 21}, client_timeout=60)
    finally:
        c.close()
