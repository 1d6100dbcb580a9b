"""The LLM prefix cache (docs/llm.md "Prefix cache"): the same answers with and
without it, `cached_tokens` in the usage, and its metrics.

Exactness is checked on the fp32 model, greedy, against a server whose cache is off
(`--llm-prefix-cache-bytes 0`): the transformers fixture prompts
(models/fixtures/transformers.json), each sent twice (the second reuses the first's
blocks), and a 5-turn chat under a ~300-token system prompt that resends the history
and the previous answers at every turn.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import ferrite_testlib as fl
from test_llm import FP32_DIR, MODEL, checked_dir, openai_client

BLOCK = 16  # tokens per cached block (llm::prefix_cache::BLOCK_TOKENS)
FIXTURES = fl.REPO_ROOT / "models" / "fixtures" / "transformers.json"

# About 300 tokens of SmolLM2's tokenizer.
SYSTEM = (
    "You are Ferrite Assistant, the help desk of a small company that sells garden tools, seeds and "
    "outdoor furniture. Answer in plain English, briefly and politely. Follow these rules. First, "
    "never invent prices: if a customer asks for a price, tell them to look at the online catalogue "
    "or to call the shop between nine in the morning and five in the afternoon, Monday to Friday. "
    "Second, orders ship within two working days; deliveries take three to five days inside the "
    "country and up to two weeks abroad. Third, returns are accepted within thirty days of delivery "
    "if the item is unused and in its original box; seeds and plants cannot be returned. Fourth, "
    "warranty claims for tools need the order number and a photo of the damage. Fifth, if a "
    "customer is angry, apologise once, then offer concrete help. Sixth, do not discuss politics, "
    "religion or other companies. Seventh, when you do not know an answer, say so and suggest "
    "writing to the support address. Our best sellers are the stainless steel spade, the bamboo "
    "rake, the folding chair made of oak, tomato seeds of the heirloom variety, and the rain "
    "barrel of two hundred litres. The shop is closed on public holidays. Keep every answer under "
    "five sentences unless the customer asks for details. If a customer asks for gardening advice, "
    "give one practical tip about watering, soil or sunlight, and recommend a product from the "
    "catalogue only when it truly helps."
)
TURNS = [
    "Hello! Do you sell rakes?",
    "How long does delivery take to my house?",
    "Can I return seeds I did not use?",
    "My spade broke after a week. What should I do?",
    "Thanks. Which chair would you recommend?",
]


def fixture_prompts() -> list[list[int]]:
    if not FIXTURES.is_file():
        fl.missing(f"{FIXTURES} not found")
    return [p["prompt_ids"] for p in json.loads(FIXTURES.read_text())["prompts"]]


def fp32_server(server_factory, cache_bytes: int | None, name: str):
    args = ["--model", f"{MODEL}={checked_dir(FP32_DIR)}"]
    if cache_bytes is not None:
        args += ["--llm-prefix-cache-bytes", str(cache_bytes)]
    return server_factory(args, name=name)


def complete(client, prompt, max_tokens=24):
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].text, reply.usage


def converse(client, max_tokens=40):
    """The 5 turns, each resending the history; returns [(answer, usage)]."""
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
        answer = reply.choices[0].message.content
        messages.append({"role": "assistant", "content": answer})
        out.append((answer, reply.usage))
    return out


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def samples(server, name):
    return fl.metric_sum(fl.parse_metrics(server.metrics_text()), name, model=MODEL)


def test_cache_on_answers_exactly_as_cache_off(server_factory):
    off = fp32_server(server_factory, 0, "prefix-off")
    on = fp32_server(server_factory, None, "prefix-on")
    off_client, on_client = openai_client(off), openai_client(on)

    prompts = fixture_prompts()
    assert len(prompts) == 6
    for ids in prompts:
        want, usage = complete(off_client, ids)
        assert cached(usage) == 0, "the cache is off"
        first, first_usage = complete(on_client, ids)
        again, again_usage = complete(on_client, ids)
        assert first == want, f"{ids}: cache on {first!r}, off {want!r}"
        assert again == want, f"{ids} (second time, cached): {again!r}, off {want!r}"
        # The second time reuses every whole block but the one with the last token.
        assert cached(again_usage) == (len(ids) - 1) // BLOCK * BLOCK, again_usage

    reference = converse(off_client)
    conversation = converse(on_client)
    previous_prompt = 0
    for turn, ((want, _), (got, usage)) in enumerate(zip(reference, conversation), 1):
        assert got == want, f"turn {turn}: cache on {got!r}, off {want!r}"
        assert cached(usage) % BLOCK == 0
        if turn == 1:
            assert usage.prompt_tokens > 250, "the system prompt is about 300 tokens"
        else:
            # The previous prompt's blocks and some of the previous answer's (cached when
            # that sequence finished) are reused.
            assert cached(usage) > previous_prompt // BLOCK * BLOCK, (turn, previous_prompt, usage)
        previous_prompt = usage.prompt_tokens

    hits = samples(on, "ferrite_llm_prefix_cache_hit_tokens_total")
    misses = samples(on, "ferrite_llm_prefix_cache_miss_tokens_total")
    prompt_tokens = samples(on, "ferrite_llm_prompt_tokens_total")
    assert hits > 1000 and misses > 0 and hits + misses == prompt_tokens, (hits, misses, prompt_tokens)
    assert samples(on, "ferrite_llm_prefix_cache_bytes") > 0
    assert samples(on, "ferrite_llm_prefix_cache_evictions_total") == 0
    assert samples(off, "ferrite_llm_prefix_cache_hit_tokens_total") == 0
    assert samples(off, "ferrite_llm_prefix_cache_bytes") == 0


def test_cached_tokens_and_eviction_within_the_budget(server_factory):
    """A shared system prompt is cached for the next user (non-streamed, streamed and
    gRPC usage say so); a small budget evicts and is never exceeded."""
    block_bytes = BLOCK * 46_080  # SmolLM2-135M: 45 KiB of KV per token
    budget = 24 * block_bytes  # one conversation's system prompt and a little more
    s = fp32_server(server_factory, budget, "prefix-small")
    client = openai_client(s)

    def ask(user, **kw):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, **kw)

    first = ask("Do you sell rakes?")
    assert cached(first.usage) == 0, "a cold cache"
    second = ask("Where is my order?")
    assert cached(second.usage) > 250 and cached(second.usage) % BLOCK == 0, second.usage
    chunks = list(ask("Can I pay by card?", stream=True, stream_options={"include_usage": True}))
    assert cached(chunks[-1].usage) == cached(second.usage), chunks[-1].usage

    # Two identical new prompts at once (as OpenAI `n` > 1 sends): the engine prefills
    # them one after the other, and the second reuses the first's blocks even when both
    # were admitted in the same iteration.
    twin = "<|im_start|>user\n" + " ".join(f"word{i}" for i in range(40)) + "<|im_end|>\n<|im_start|>assistant\n"
    with ThreadPoolExecutor(2) as pool:
        usages = sorted(pool.map(lambda _: complete(client, twin, max_tokens=2)[1], range(2)), key=cached)
    assert cached(usages[0]) == 0 and cached(usages[1]) == (usages[1].prompt_tokens - 1) // BLOCK * BLOCK, usages

    # OpenAI `n` = 3 on a new prompt: the first choice computes it, the other two
    # reuse its blocks (they arrive in one iteration and wait for their twin).
    triplet = twin.replace("word", "term")
    hits = samples(s, "ferrite_llm_prefix_cache_hit_tokens_total")
    reply = client.completions.create(model=MODEL, prompt=triplet, n=3, max_tokens=2, temperature=0)
    assert len(reply.choices) == 3 and cached(reply.usage) == 0, reply.usage
    shared = (reply.usage.prompt_tokens - 1) // BLOCK * BLOCK
    assert samples(s, "ferrite_llm_prefix_cache_hit_tokens_total") - hits == 2 * shared, (hits, shared)

    import tritonclient.grpc as grpcclient
    from test_llm import grpc_inputs

    text = "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    c = s.grpc_client()
    try:
        for _ in range(2):
            result = c.infer(
                MODEL,
                grpc_inputs(text),
                outputs=[grpcclient.InferRequestedOutput("text_output")],
                parameters={"max_tokens": 2, "temperature": 0},
                client_timeout=300,
            )
        assert result.get_response().parameters["cached_tokens"].int64_param > 250
    finally:
        c.close()

    assert samples(s, "ferrite_llm_prefix_cache_bytes") <= budget
    # Other system prompts push the first one out, least recently used first.
    for n in range(3):
        other = [{"role": "system", "content": f"Variant {n}. " + SYSTEM}, {"role": "user", "content": "Hi"}]
        client.chat.completions.create(model=MODEL, messages=other, max_tokens=2, temperature=0)
        assert samples(s, "ferrite_llm_prefix_cache_bytes") <= budget
    assert samples(s, "ferrite_llm_prefix_cache_evictions_total") > 0
    assert cached(ask("Do you sell rakes?").usage) == 0, "evicted"
