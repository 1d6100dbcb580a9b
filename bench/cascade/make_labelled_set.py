#!/usr/bin/env python3
"""Writes bench/cascade/labelled_set.jsonl: 300 short prompts with known answers
for the cascade benchmark (issue 14), in fixed templates, from a fixed seed (the
same file on every run):

  arithmetic  "What is 17 + 25? Answer with the number only."   (+, -, x)
  capital     "What is the capital of France? Answer with the city name only."
  yesno       "Is 31 greater than 14? Answer yes or no."        (numbers, parity, animals, capitals)
  sentiment   "Is this review positive or negative? Review: ... Answer with one word."

Each line: {"id", "category", "prompt", "expected", "accept"?}; `expected` is the
canonical answer (the macro stand-in answers it) and bench/cascade/labels.py's
checker for the category decides whether an answer is right.

    python bench/cascade/make_labelled_set.py [--out FILE] [--check]

--check: regenerate in memory and fail if the committed file differs.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 14
PER_CATEGORY = 75
OUT = Path(__file__).resolve().parent / "labelled_set.jsonl"

# (country, capital, other accepted spellings)
CAPITALS = [
    ("France", "Paris", []), ("Germany", "Berlin", []), ("Italy", "Rome", []), ("Spain", "Madrid", []),
    ("Portugal", "Lisbon", []), ("the United Kingdom", "London", []), ("Ireland", "Dublin", []),
    ("the Netherlands", "Amsterdam", []), ("Belgium", "Brussels", []), ("Austria", "Vienna", []),
    ("Switzerland", "Bern", ["Berne"]), ("Poland", "Warsaw", []), ("Sweden", "Stockholm", []),
    ("Norway", "Oslo", []), ("Denmark", "Copenhagen", []), ("Finland", "Helsinki", []),
    ("Greece", "Athens", []), ("Hungary", "Budapest", []), ("the Czech Republic", "Prague", []),
    ("Romania", "Bucharest", []), ("Bulgaria", "Sofia", []), ("Serbia", "Belgrade", []),
    ("Croatia", "Zagreb", []), ("Ukraine", "Kyiv", ["Kiev"]), ("Russia", "Moscow", []),
    ("Turkey", "Ankara", []), ("Egypt", "Cairo", []), ("Kenya", "Nairobi", []), ("Nigeria", "Abuja", []),
    ("Ghana", "Accra", []), ("Ethiopia", "Addis Ababa", []), ("Morocco", "Rabat", []),
    ("Algeria", "Algiers", []), ("Tunisia", "Tunis", []), ("Senegal", "Dakar", []),
    ("Japan", "Tokyo", []), ("China", "Beijing", ["Peking"]), ("South Korea", "Seoul", []),
    ("India", "New Delhi", []), ("Pakistan", "Islamabad", []), ("Bangladesh", "Dhaka", []),
    ("Thailand", "Bangkok", []), ("Vietnam", "Hanoi", []), ("Indonesia", "Jakarta", []),
    ("the Philippines", "Manila", []), ("Malaysia", "Kuala Lumpur", []), ("Iran", "Tehran", []),
    ("Iraq", "Baghdad", []), ("Saudi Arabia", "Riyadh", []), ("Israel", "Jerusalem", []),
    ("Afghanistan", "Kabul", []), ("Nepal", "Kathmandu", []), ("Mongolia", "Ulaanbaatar", ["Ulan Bator"]),
    ("Australia", "Canberra", []), ("New Zealand", "Wellington", []), ("Canada", "Ottawa", []),
    ("the United States", "Washington, D.C.", ["Washington"]), ("Mexico", "Mexico City", []),
    ("Cuba", "Havana", []), ("Jamaica", "Kingston", []), ("Colombia", "Bogota", ["Bogotá"]),
    ("Venezuela", "Caracas", []), ("Peru", "Lima", []), ("Chile", "Santiago", []),
    ("Argentina", "Buenos Aires", []), ("Brazil", "Brasilia", ["Brasília"]), ("Uruguay", "Montevideo", []),
    ("Paraguay", "Asuncion", ["Asunción"]), ("Ecuador", "Quito", []), ("Bolivia", "Sucre", ["La Paz"]),
    ("Iceland", "Reykjavik", ["Reykjavík"]), ("Estonia", "Tallinn", []), ("Latvia", "Riga", []),
    ("Lithuania", "Vilnius", []), ("Slovakia", "Bratislava", []), ("Slovenia", "Ljubljana", []),
]

# (subject, property, true?) for "Is a dolphin a mammal?"-style questions.
ANIMALS = [
    ("a dolphin", "a mammal", True), ("a shark", "a mammal", False), ("a bat", "a mammal", True),
    ("a penguin", "a bird", True), ("a whale", "a fish", False), ("a frog", "an amphibian", True),
    ("a snake", "a reptile", True), ("a spider", "an insect", False), ("an ant", "an insect", True),
    ("a salmon", "a fish", True), ("a cow", "a herbivore", True), ("a lion", "a herbivore", False),
    ("a tomato", "a fruit", True), ("a potato", "a fruit", False), ("an eagle", "a bird", True),
    ("a crocodile", "a mammal", False), ("a horse", "a mammal", True), ("an octopus", "a fish", False),
]

PRODUCTS = ["coffee maker", "hotel room", "phone case", "pizza", "movie", "laptop", "pair of shoes",
            "restaurant", "book", "headphones", "backpack", "taxi ride", "desk lamp", "concert", "blender"]
POSITIVE = ["excellent", "wonderful", "great", "fantastic", "delightful", "superb", "lovely", "amazing"]
NEGATIVE = ["terrible", "awful", "disappointing", "horrible", "dreadful", "useless", "poor", "broken"]
POS_TAILS = ["I would buy it again.", "Highly recommended.", "It made my day.", "Worth every penny.",
             "I loved it."]
NEG_TAILS = ["I want my money back.", "Never again.", "It ruined my evening.", "A complete waste of money.",
             "I hated it."]


def arithmetic(rng: random.Random) -> list[dict]:
    out, seen = [], set()
    i = 0
    while len(out) < PER_CATEGORY:
        op = ("+", "-", "*")[i % 3]
        i += 1
        if op == "+":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            value, shown = a + b, "+"
        elif op == "-":
            a = rng.randint(20, 99)
            b = rng.randint(1, a - 1)
            value, shown = a - b, "-"
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 19)
            value, shown = a * b, "times"
        prompt = f"What is {a} {shown} {b}? Answer with the number only."
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"category": "arithmetic", "prompt": prompt, "expected": str(value), "operands": [a, b]})
    return out


def capitals(rng: random.Random) -> list[dict]:
    chosen = rng.sample(CAPITALS, PER_CATEGORY)
    return [{"category": "capital",
             "prompt": f"What is the capital of {country}? Answer with the city name only.",
             "expected": capital, **({"accept": accept} if accept else {})}
            for country, capital, accept in chosen]


def yesno(rng: random.Random) -> list[dict]:
    out, seen = [], set()
    kinds = ["greater", "even", "animal", "capital"]
    i = 0
    while len(out) < PER_CATEGORY:
        kind = kinds[i % len(kinds)]
        i += 1
        if kind == "greater":
            a, b = rng.sample(range(1, 100), 2)
            prompt, truth = f"Is {a} greater than {b}?", a > b
        elif kind == "even":
            n = rng.randint(1, 99)
            prompt, truth = f"Is {n} an even number?", n % 2 == 0
        elif kind == "animal":
            subject, prop, truth = rng.choice(ANIMALS)
            prompt = f"Is {subject} {prop}?"
        else:
            country, capital, _ = rng.choice(CAPITALS)
            truth = rng.random() < 0.5
            if not truth:
                capital = rng.choice([c for _, c, _ in CAPITALS if c != capital])
            prompt = f"Is {capital} the capital of {country}?"
        if prompt in seen:  # each prompt once: the stand-in looks answers up by prompt
            continue
        seen.add(prompt)
        out.append({"category": "yesno", "prompt": f"{prompt} Answer yes or no.", "expected": "yes" if truth else "no"})
    return out


def sentiment(rng: random.Random) -> list[dict]:
    out, seen = [], set()
    while len(out) < PER_CATEGORY:
        positive = len(out) % 2 == 0
        product = rng.choice(PRODUCTS)
        adjective = rng.choice(POSITIVE if positive else NEGATIVE)
        tail = rng.choice(POS_TAILS if positive else NEG_TAILS)
        review = f"The {product} was {adjective}. {tail}"
        if review in seen:
            continue
        seen.add(review)
        out.append({"category": "sentiment",
                    "prompt": f"Is this review positive or negative? Review: \"{review}\" Answer with one word.",
                    "expected": "positive" if positive else "negative"})
    return out


def build() -> list[dict]:
    rng = random.Random(SEED)
    records = arithmetic(rng) + capitals(rng) + yesno(rng) + sentiment(rng)
    # interleave the categories so that a sample of the first k has all four
    random.Random(SEED + 1).shuffle(records)
    out = [{"id": i, **r} for i, r in enumerate(records)]
    prompts = [r["prompt"] for r in out]
    if len(set(prompts)) != len(prompts):  # the stand-in looks answers up by prompt
        dupes = len(prompts) - len(set(prompts))
        raise SystemExit(f"{dupes} duplicate prompts: change the templates or the seed")
    return out


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="fail if the committed file is not what the script writes")
    a = ap.parse_args()
    text = render(build())
    if a.check:
        if not a.out.exists() or a.out.read_text(encoding="utf-8") != text:
            sys.exit(f"{a.out} is not what {Path(__file__).name} writes: regenerate it")
        print(f"{a.out}: up to date")
        return
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {a.out} ({text.count(chr(10))} prompts)")


if __name__ == "__main__":
    main()
