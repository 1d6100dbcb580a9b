"""The request contents of `make bench-llm` (bench/llm_bench.py): the chat workload's
system prompt and users, the single-prompt workload's prompts, and the long prompt of
the prefill-interference cell. Plain data and builders, no I/O besides the tokenizer.

Every cell gets contents no earlier cell of the same server has sent (a tag in each
conversation's first message, a rotating prompt list), so that a prompt cache only
ever helps with what real traffic shares: the system prompt, and within one
conversation the history resent at every turn.
"""
from __future__ import annotations

# A realistic support-bot system prompt (~300 tokens with SmolLM2's tokenizer;
# the run counts and records the exact figure).
SYSTEM_PROMPT = (
    "You are Juniper, the customer support assistant of Northwind Cycles, an online shop that sells city bikes, "
    "electric bikes, spare parts and accessories in Europe. Answer the customer's questions politely, briefly and "
    "accurately, in the language the customer writes in.\n\n"
    "Policies you must follow:\n"
    "1. Orders ship within two working days from our warehouse in Rotterdam. Standard delivery takes 3 to 5 working "
    "days and is free above 50 euros; express delivery costs 14.90 euros.\n"
    "2. Customers may return any unused item within 30 days of delivery for a full refund. Bikes go back in their "
    "original box; we send a prepaid label. Refunds reach the original payment method within 5 working days.\n"
    "3. Every bike has a two-year warranty on parts and a five-year warranty on the frame. Batteries are covered for "
    "two years or 500 charge cycles. Wear parts (tyres, brake pads, chains) are not covered.\n"
    "4. Never promise a delivery date, a refund or a repair that these policies do not allow; offer to hand the "
    "conversation over to a human colleague instead.\n"
    "5. For safety problems (brakes, a damaged battery, a cracked frame), tell the customer to stop riding and to "
    "contact a bike workshop.\n\n"
    "Keep answers under 120 words and end by asking if you can help with anything else."
)

# One opening question per user (16 users).
OPENINGS = [
    "My e-bike arrived yesterday but the battery will not charge. What should I do?",
    "I ordered a city bike last week and it still has not shipped. Where is it?",
    "Can I return a helmet I bought three weeks ago? I never wore it.",
    "The front brake of my new bike squeaks loudly when I stop. Is that normal?",
    "Do you deliver to Portugal, and how long does it take?",
    "I want to buy a bike for my daughter, she is nine. Which size do I need?",
    "My refund has not reached my bank account yet. It has been four days.",
    "The frame of my two-year-old bike has a small crack near the seat post.",
    "How much is express delivery and when would my parcel arrive?",
    "Can I change the delivery address of an order I placed this morning?",
    "My chain keeps falling off when I change gear. Is that under warranty?",
    "I received the wrong colour of the bike I ordered. Can you swap it?",
    "Is it safe to ride my e-bike in heavy rain?",
    "I lost the original box of my bike. Can I still return it?",
    "How many charge cycles does the battery of an e-bike last?",
    "Do you sell spare batteries for the Northwind E-City 500?",
]

# Follow-up turns; user u's turn t (t >= 1) asks FOLLOW_UPS[(u + t) % len].
FOLLOW_UPS = [
    "Thanks. Can you explain that again in simpler words?",
    "How long will that take, roughly?",
    "What happens if that does not solve the problem?",
    "Is there any cost for me in doing that?",
    "Can you give me a short list of the steps?",
    "Could a human colleague call me about this instead?",
    "Does the warranty cover that, and for how long?",
    "What information do you need from me to start?",
]

# The single-prompt workload: short distinct prompts (~15-40 tokens with the
# template), SUBJECTS x ASKS combined, rotated through the run.
SUBJECTS = [
    "why the sky is blue", "how a bicycle stays upright", "what a prime number is", "how bread rises",
    "why leaves change colour in autumn", "how a rainbow forms", "what causes the tides", "how vaccines work",
    "why ice floats on water", "how a compass works", "what photosynthesis does", "how an electric motor turns",
    "why we have seasons", "how bees make honey", "what a black hole is", "how a refrigerator keeps food cold",
    "why the ocean is salty", "how sound travels", "what DNA is", "how a lighthouse helps ships",
    "why cats purr", "how clouds form", "what inflation means", "how a battery stores energy",
]
ASKS = [
    "Explain in two sentences {s}.",
    "Tell a ten-year-old {s}.",
    "In plain words, describe {s}.",
    "Write a short paragraph about {s}.",
    "Give me three quick facts about {s}.",
    "Summarise {s} for a science quiz.",
    "What is the simplest way to explain {s}?",
    "Briefly, for a school report: {s}.",
]


def single_prompts() -> list[str]:
    """All SUBJECTS x ASKS prompts, interleaved so neighbours differ in both."""
    out = []
    for i in range(len(SUBJECTS) * len(ASKS)):
        s = SUBJECTS[i % len(SUBJECTS)]
        a = ASKS[(i // len(SUBJECTS) + i) % len(ASKS)]
        out.append(a.format(s=s))
    return out


def user_turn(cell: str, user: int, turn: int) -> str:
    """The user's message at `turn` (0-based); the first names an order number
    unique to the cell, so no cell reuses another's conversations."""
    if turn == 0:
        return f"Hello, my order number is NW-{cell}-{user:03d}. {OPENINGS[user % len(OPENINGS)]}"
    return FOLLOW_UPS[(user + turn) % len(FOLLOW_UPS)]


# Paragraph pieces for the long prompt of the prefill-interference cell.
_LONG_PARTS = [
    "Section {i}. The committee reviewed the delivery figures for region {r}: {a} orders were shipped on time and "
    "{b} were late because of a shortage of cardboard boxes at the warehouse.",
    "The service team reported {a} warranty claims for region {r}, most of them about brake pads and chains, "
    "which the policy treats as wear parts; {b} claims concerned frames.",
    "Marketing proposed a spring campaign for region {r} with a budget of {a} thousand euros and asked for {b} "
    "demonstration bikes to lend to local cycling clubs.",
]


def long_prompt(tokenizer, target_tokens: int = 1500) -> str:
    """A meeting-minutes document of about `target_tokens` tokens, with the
    question, for the prefill-interference cell."""
    head = "Here are the minutes of our quarterly meeting. Summarise the main decisions.\n\n"
    text, i = head, 0
    while True:
        part = _LONG_PARTS[i % len(_LONG_PARTS)].format(i=i + 1, r=chr(65 + i % 26), a=37 + 13 * i % 211,
                                                          b=5 + 7 * i % 53)
        candidate = text + part + "\n"
        if tokenizer is not None and len(tokenizer.encode(candidate, add_special_tokens=False).ids) > target_tokens:
            return text
        if tokenizer is None and len(candidate) > 4 * target_tokens:
            return text
        text, i = candidate, i + 1
