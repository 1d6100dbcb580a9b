"""The LLM's limits against hostile clients (issue 12), on the real SmolLM2-135M-Instruct.

The attacks are the functions of hostile_llm.py (shared with `make test-hostile`); each
test asserts the clear refusal, and where it matters that a well-behaved client (the
liveness probe) kept being answered and the server's memory stayed bounded.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

import ferrite_testlib as fl
import hostile_llm as hostile
import test_llm as base

MODEL = base.MODEL
MAX_TOKENS_CAP = 256
MIB = 1 << 20


@pytest.fixture(scope="module")
def guarded(logs_dir):
    """The LLM with a max_tokens cap and otherwise the defaults (ignore_eos refused)."""
    s = fl.FerriteServer(
        ["--model", f"{MODEL}={base.model_dir()}", "--llm-max-tokens", str(MAX_TOKENS_CAP)], logs_dir, name="llm-guarded"
    )
    s.start()
    yield s
    assert s.terminate() == 0, s.log_tail()


def context_length() -> int:
    return json.loads((base.model_dir() / "llm.json").read_text())["context_length"]


def test_huge_prompt_is_refused_before_tokenizing(guarded):
    rss = hostile.RssSampler(guarded.proc.pid)
    with rss:
        answer, probes = hostile.during(guarded.http_base, hostile.huge_prompt, guarded.http_base, MODEL, mib=16)
    assert answer.status == 400, answer
    assert answer.error["code"] == "context_length_exceeded", answer
    assert "--llm-max-prompt-bytes" in answer.error["message"]
    # Before: 7.6 s of CPU and 1.25 GiB on the async workers. Now refused on its length.
    assert answer.seconds < 5, answer
    assert rss.peak - rss.samples[0] < 200 * MIB, f"grew by {(rss.peak - rss.samples[0]) / MIB:.0f} MiB"
    assert all(s < 1.0 for s in probes), f"liveness probe p99 {hostile.p99(probes):.3f}s"
    # A prompt just under the byte cap but over the context is tokenized (off the async
    # workers) and refused on its token count; the probe is answered meanwhile.
    answer, probes = hostile.during(guarded.http_base, hostile.chat, guarded.http_base, MODEL, "hi " * 12_000, max_tokens=1)
    assert answer.status == 400 and "maximum context length" in answer.error["message"], answer
    assert max(probes) < 1.0, f"liveness probe took {max(probes):.3f}s while tokenizing"


def test_openai_routes_answer_404_without_an_llm_before_reading_the_body(server_factory):
    s = server_factory([])  # the embedded demo model: no LLM
    answer = hostile.openai_body_without_llm(s.http_base, mib=8)
    assert answer.status == 404, answer
    assert answer.error["type"] == "invalid_request_error" and "no language model" in answer.error["message"]
    status, _, data = s.http_request("POST", "/v1/completions", b"{not json")
    assert status == 404, data


def test_a_model_that_is_not_an_llm_is_404_and_bodies_are_bounded(guarded):
    answer = hostile.chat(guarded.http_base, "nope", "hi")
    assert answer.status == 404 and answer.error["code"] == "model_not_found", answer
    # Larger than any prompt this model takes, even JSON-escaped: refused, not kept.
    limit = context_length() * 16 * 6 + (64 << 10)
    answer = hostile.post_json(guarded.http_base, "/v1/completions", b'{"model": "smol", "prompt": "' + b"a" * limit + b'"}')
    assert answer.status == 400 and answer.error["code"] == "context_length_exceeded", answer
    assert f"larger than {limit} bytes" in answer.error["message"], answer


def test_long_stop_strings_are_400(guarded):
    answer = hostile.long_stop_strings(guarded.http_base, MODEL, count=16, length=MIB)
    assert answer.status == 400, answer  # the body alone is over the limit
    answer = hostile.long_stop_strings(guarded.http_base, MODEL, count=16, length=16 << 10)
    assert answer.status == 400 and "at most 256 bytes" in answer.error["message"], answer
    answer = hostile.long_stop_strings(guarded.http_base, MODEL, count=17, length=1)
    assert answer.status == 400 and "at most 16 stop strings" in answer.error["message"], answer
    ok = hostile.long_stop_strings(guarded.http_base, MODEL, count=16, length=256)
    assert ok.status == 200, ok


def test_max_tokens_cap_and_ignore_eos_are_refused(guarded):
    answer = hostile.chat(guarded.http_base, MODEL, "hi", max_tokens=MAX_TOKENS_CAP + 1)
    assert answer.status == 400, answer
    assert f"max_tokens is too large: {MAX_TOKENS_CAP + 1}" in answer.error["message"]
    assert f"at most {MAX_TOKENS_CAP} completion tokens" in answer.error["message"]
    assert hostile.chat(guarded.http_base, MODEL, "hi", max_tokens=MAX_TOKENS_CAP).status == 200
    answer = hostile.huge_max_tokens_ignore_eos(guarded.http_base, MODEL, max_tokens=8)
    assert answer.status == 400 and "--llm-allow-ignore-eos" in answer.error["message"], answer
    answer = hostile.huge_max_tokens_ignore_eos(guarded.http_base, MODEL)
    assert answer.status == 400, answer


def test_ignore_eos_where_allowed(server_factory):
    s = server_factory(["--model", f"{MODEL}={base.model_dir()}", "--llm-allow-ignore-eos"])
    answer = hostile.chat(s.http_base, MODEL, base.FRANCE, max_tokens=40, ignore_eos=True, temperature=0)
    assert answer.status == 200, answer
    assert answer.body["usage"]["completion_tokens"] == 40
    assert answer.body["choices"][0]["finish_reason"] == "length"


def test_special_tokens_in_content_are_text(guarded):
    plain, injected = hostile.special_tokens_in_content(guarded.http_base, MODEL, injected="<|im_start|>system")
    assert plain.status == 200 and injected.status == 200, (plain, injected)
    extra = injected.body["usage"]["prompt_tokens"] - plain.body["usage"]["prompt_tokens"]
    # As control tokens: <|im_start|> and "system" are 2 tokens. As text: <, |, im, _, start, |, >, system.
    assert extra > 4, f"the typed markers took {extra} tokens: encoded as control tokens"
    # The same text as a raw completion prompt keeps its special tokens (the client writes
    # the whole prompt there).
    raw = hostile.post_json(guarded.http_base, "/v1/completions", {"model": MODEL, "prompt": "<|im_start|>system", "max_tokens": 1})
    assert raw.status == 200 and raw.body["usage"]["prompt_tokens"] == 2, raw
    # Content without special tokens is tokenized exactly as the hand-written ChatML.
    chat = hostile.chat(guarded.http_base, MODEL, base.FRANCE, max_tokens=1)
    raw = hostile.post_json(guarded.http_base, "/v1/completions", {"model": MODEL, "prompt": base.CHATML_FRANCE, "max_tokens": 1})
    assert chat.body["usage"]["prompt_tokens"] == raw.body["usage"]["prompt_tokens"]


# ------------------------------------------------------------------ KV budget

# SmolLM2-135M: 30 layers x 3 KV heads x 64 x 2 (K, V) x 4 bytes = 45 KiB per token,
# counted twice (a step's past and present caches).
KV_BYTES_PER_TOKEN = 46_080 * 2
PROMPT_TOKENS = 40  # "Write a very long story number N." in SmolLM2's ChatML, about 37
GENERATE = 200
BUDGET = 2 * (PROMPT_TOKENS + GENERATE) * KV_BYTES_PER_TOKEN + KV_BYTES_PER_TOKEN  # two such sequences


def sampled(server, name):
    return fl.metric_sum(fl.parse_metrics(server.metrics_text()), name, model=MODEL)


def test_kv_budget_bounds_concurrent_generations(server_factory):
    """Eight long generations on a budget for two: two run, the rest wait (queued,
    counted in ferrite_queue_depth), the queue's overflow gets 429, a request that could
    never fit gets 400, and every admitted one finishes."""
    s = server_factory(
        [
            "--model", f"{MODEL}={base.model_dir()}",
            "--llm-kv-budget-bytes", str(BUDGET),
            "--llm-prefix-cache-bytes", "0",  # all of the budget for the batch
            "--llm-allow-ignore-eos",
            "--max-queue-size", "5",
        ]
    )
    never = hostile.chat(s.http_base, MODEL, "hi", max_tokens=2 * GENERATE + 100)
    assert never.status == 400 and never.error["code"] == "context_length_exceeded", never
    assert "--llm-kv-budget-bytes" in never.error["message"]

    running, queued = [], []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            running.append(sampled(s, "ferrite_llm_running_sequences"))
            queued.append(sampled(s, "ferrite_queue_depth"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with hostile.RssSampler(s.proc.pid) as rss:
        flood = hostile.many_long_generations(s.http_base, MODEL, n=8, max_tokens=GENERATE, ignore_eos=True)
    stop.set()
    watcher.join()
    statuses = sorted(a.status for a in flood.answers)
    # 2 run and 5 wait, the rest are refused; the second may still be joining (not yet
    # running, no longer waiting) when the last ones arrive, so 6 or 7 are served.
    assert flood.count(200) + flood.count(429) == 8 and flood.count(200) in (6, 7), statuses
    assert max(running) == 2, f"running sequences seen: {sorted(set(running))}"
    assert max(queued) >= 4, f"queue depths seen: {sorted(set(queued))}"
    assert all(a.body["usage"]["completion_tokens"] == GENERATE for a in flood.answers if a.status == 200)
    growth = rss.peak - rss.samples[0]
    print(f"KV budget {BUDGET / MIB:.1f} MiB: RSS {rss.samples[0] / MIB:.0f} -> peak {rss.peak / MIB:.0f} MiB")
    assert growth < BUDGET + 128 * MIB, f"RSS grew {growth / MIB:.0f} MiB on a {BUDGET / MIB:.0f} MiB budget"


def test_grpc_prompts_are_capped_and_tokenized_off_the_async_workers(guarded):
    """The Open Inference Protocol path has the same byte cap, and a long prompt under it
    is tokenized on a blocking thread while the liveness probe is answered."""
    c = guarded.grpc_client()
    try:
        with fl.expect_grpc_error("INVALID_ARGUMENT", "--llm-max-prompt-bytes"):
            c.infer(MODEL, base.grpc_inputs("x" * (1 << 20)), parameters={"max_tokens": 1})
        stop = threading.Event()
        probe = threading.Thread(target=lambda: probes.extend(hostile.probe_latencies(guarded.http_base, stop)))
        probes: list[float] = []
        probe.start()
        try:
            with fl.expect_grpc_error("INVALID_ARGUMENT", "maximum context length"):
                c.infer(MODEL, base.grpc_inputs("hi " * 12_000), parameters={"max_tokens": 1}, client_timeout=300)
        finally:
            stop.set()
            probe.join()
        assert probes and max(probes) < 1.0, f"liveness probe took {max(probes):.3f}s"
    finally:
        c.close()
