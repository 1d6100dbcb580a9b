"""Attacks on an LLM: one request that stalls or exhausts the model.

The attacked server serves SmolLM2 (int4) beside the tensor test models, with
a KV budget of 256 MiB set by flag. The flood's bound is that budget plus the
margin the server keeps when it derives a budget from the pod's memory limit
(at least 512 MiB, `llm::limits`): activations and allocator slack come on top
of the KV caches (measured: 150-410 MiB). The good client calls add_sub on the same
server: a stall of the async workers shows in its latency.
"""

from __future__ import annotations

import pytest

import hostile_llm as attack
from conftest import LLM_MODEL
from siege import Siege

KV_BUDGET_MIB = 256
KV_MARGIN_MIB = 512


@pytest.fixture(scope="module")
def llm(target_factory):
    return target_factory(["--llm-kv-budget-bytes", str(KV_BUDGET_MIB << 20)], name="llm", llm=True)


def test_16_mib_prompt(llm):
    server = llm.get()
    with Siege(server, "16 MiB chat prompt", rss_growth_bound_mib=64) as siege:
        answer = attack.huge_prompt(server.http_base, LLM_MODEL, mib=16)
        siege.outcome = f"HTTP {answer.status} {answer.error.get('code') or ''} in {answer.seconds:.2f} s"
    assert answer.status == 400, answer


def test_openai_body_without_an_llm(target):
    server = target.get()
    with Siege(server, "8 MiB OpenAI body to a server without an LLM", rss_growth_bound_mib=32) as siege:
        answer = attack.openai_body_without_llm(server.http_base, mib=8)
        siege.outcome = f"HTTP {answer.status} in {answer.seconds:.2f} s"
    assert answer.status == 404, answer


def test_long_stop_strings(llm):
    server = llm.get()
    with Siege(server, "16 stop strings of 1 MiB", rss_growth_bound_mib=64) as siege:
        answer = attack.long_stop_strings(server.http_base, LLM_MODEL)
        siege.outcome = f"HTTP {answer.status} in {answer.seconds:.2f} s"
    assert answer.status == 400, answer


def test_endless_generation(llm):
    server = llm.get()
    with Siege(server, "max_tokens 2^30 + ignore_eos", rss_growth_bound_mib=32) as siege:
        answer = attack.huge_max_tokens_ignore_eos(server.http_base, LLM_MODEL)
        siege.outcome = f"HTTP {answer.status} in {answer.seconds:.2f} s"
    assert answer.status == 400, answer


def test_special_tokens_typed_in_content(llm):
    server = llm.get()
    with Siege(server, "control tokens typed in chat content", rss_growth_bound_mib=64) as siege:
        plain, injected = attack.special_tokens_in_content(server.http_base, LLM_MODEL)
        extra = injected.body["usage"]["prompt_tokens"] - plain.body["usage"]["prompt_tokens"]
        siege.outcome = f"HTTP {injected.status}, encoded as text (+{extra} prompt tokens)"
    # As control tokens the three markers would add 3 tokens plus the words; as text, many more.
    assert injected.status == 200 and extra > 10, (plain, injected)


def test_many_long_generations(llm):
    server = llm.get()
    with Siege(server, f"16 concurrent 800-token generations (KV budget {KV_BUDGET_MIB} MiB)",
               rss_growth_bound_mib=KV_BUDGET_MIB + KV_MARGIN_MIB) as siege:
        flood = attack.many_long_generations(server.http_base, LLM_MODEL, n=16, max_tokens=800)
        counts = {status: flood.count(status) for status in sorted({a.status for a in flood.answers})}
        siege.outcome = "HTTP " + ", ".join(f"{status} x{n}" for status, n in counts.items())
    assert set(counts) <= {200, 429} and counts.get(200, 0) > 0, counts
