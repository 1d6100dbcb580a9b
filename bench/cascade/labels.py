"""The labelled set of the cascade benchmark (bench/cascade/labelled_set.jsonl,
written by make_labelled_set.py): loading it and one checker per category, which
decides whether a model's free-text answer is the expected one.

The checkers are lenient about form and strict about content: "Paris" is right
in "The capital is Paris.", "42" in "17 + 25 = 42", "yes" in "Yes, it is."; the
first answer-like word decides (so "no, yes" is "no").
"""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

SET = Path(__file__).resolve().parent / "labelled_set.jsonl"
CATEGORIES = ("arithmetic", "capital", "yesno", "sentiment")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def load(path: Path = SET) -> list[dict]:
    """The records of the set, in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def normalize(text: str) -> str:
    """Lower case, accents dropped, punctuation as spaces, spaces collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def _numbers(text: str) -> list[int | float]:
    out = []
    for m in NUMBER.findall(text):
        raw = m.replace(",", "")
        try:
            out.append(float(raw) if "." in raw else int(raw))
        except ValueError:
            continue
    return out


def check_arithmetic(record: dict, answer: str) -> bool:
    """The first number in the answer that is not an operand echoed back
    ("17 + 25 = 42") is the expected value."""
    operands = set(record.get("operands") or [])
    candidates = [n for n in _numbers(answer) if n not in operands]
    if not candidates:
        # the value may equal an operand (40 - 20): then the last number decides
        candidates = _numbers(answer)[-1:]
    return bool(candidates) and candidates[0] == int(record["expected"])


def check_capital(record: dict, answer: str) -> bool:
    """The capital (or an accepted spelling) appears as whole words."""
    said = f" {normalize(answer)} "
    names = [record["expected"]] + list(record.get("accept") or [])
    return any(f" {normalize(n)} " in said for n in names)


def _first_of(answer: str, words: tuple[str, str]) -> str | None:
    found = [(m.start(), w) for w in words for m in re.finditer(rf"\b{w}\b", normalize(answer))]
    return min(found)[1] if found else None


def check_yesno(record: dict, answer: str) -> bool:
    """The first "yes" or "no" word is the expected one."""
    return _first_of(answer, ("yes", "no")) == record["expected"]


def check_sentiment(record: dict, answer: str) -> bool:
    """The first "positive" or "negative" word is the expected one."""
    return _first_of(answer, ("positive", "negative")) == record["expected"]


CHECKERS = {"arithmetic": check_arithmetic, "capital": check_capital, "yesno": check_yesno,
            "sentiment": check_sentiment}


def check(record: dict, answer: str) -> bool:
    """Whether `answer` is right for `record`."""
    return CHECKERS[record["category"]](record, answer)
