"""The cascade benchmark's labelled set (bench/cascade): the committed file is what
its script writes, every checker accepts its own expected answer in the forms a
model gives it and refuses wrong ones, and the macro stand-in answers each prompt
with its label over the OpenAI API (streaming and not). No ferrite-server needed."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

CASCADE = Path(__file__).resolve().parents[3] / "bench" / "cascade"
sys.path.insert(0, str(CASCADE))
import labels  # noqa: E402
import macro_standin  # noqa: E402


def test_committed_set_is_what_the_script_writes():
    p = subprocess.run([sys.executable, str(CASCADE / "make_labelled_set.py"), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_set_shape():
    records = labels.load()
    assert len(records) == 300
    assert collections.Counter(r["category"] for r in records) == {c: 75 for c in labels.CATEGORIES}
    assert len({r["prompt"] for r in records}) == 300
    assert [r["id"] for r in records] == list(range(300))
    # the answers are the right ones, recomputed
    for r in records:
        if r["category"] == "arithmetic":
            a, b = r["operands"]
            op = r["prompt"].split()[3]
            assert int(r["expected"]) == {"+": a + b, "-": a - b, "times": a * b}[op], r
    # both answers occur in the two-way categories, neither dominating
    for cat, words in (("yesno", ("yes", "no")), ("sentiment", ("positive", "negative"))):
        counts = collections.Counter(r["expected"] for r in records if r["category"] == cat)
        assert set(counts) == set(words) and min(counts.values()) >= 25, counts


def test_every_expected_answer_checks():
    for r in labels.load():
        assert labels.check(r, r["expected"]), r
        assert labels.check(r, f"The answer is {r['expected']}."), r


ARITH = {"category": "arithmetic", "expected": "42", "operands": [17, 25]}
SUB = {"category": "arithmetic", "expected": "20", "operands": [40, 20]}
CAPITAL = {"category": "capital", "expected": "Paris"}
ACCENT = {"category": "capital", "expected": "Bogota", "accept": ["Bogotá"]}
DC = {"category": "capital", "expected": "Washington, D.C.", "accept": ["Washington"]}
YES = {"category": "yesno", "expected": "yes"}
NEG = {"category": "sentiment", "expected": "negative"}


@pytest.mark.parametrize("record,answer,right", [
    (ARITH, "42", True), (ARITH, "17 + 25 = 42", True), (ARITH, "The answer is 42.", True),
    (ARITH, "43", False), (ARITH, "17 + 25 = 43", False), (ARITH, "I cannot say", False), (ARITH, "420", False),
    (ARITH, "1,042", False),
    (SUB, "20", True), (SUB, "40 - 20 = 20", True), (SUB, "40", False),
    (CAPITAL, "Paris", True), (CAPITAL, "The capital is Paris.", True), (CAPITAL, "paris!", True),
    (CAPITAL, "Lyon", False), (CAPITAL, "Parisian", False), (CAPITAL, "", False),
    (ACCENT, "Bogotá", True), (ACCENT, "BOGOTA", True), (DC, "Washington D.C.", True), (DC, "Washington", True),
    (YES, "Yes.", True), (YES, "yes, it is", True), (YES, "No.", False), (YES, "No, yes", False),
    (YES, "Nobody knows", False), (YES, "Yesterday", False),
    (NEG, "Negative", True), (NEG, "The review is negative.", True), (NEG, "positive", False),
    (NEG, "It is not positive, it is negative", False), (NEG, "neutral", False),
])
def test_checkers(record, answer, right):
    assert labels.check(record, answer) is right


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def test_standin_answers_from_the_labels():
    records = labels.load()
    server = macro_standin.serve(0, records)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        r = records[0]
        chat = json.loads(_post(base + "/v1/chat/completions", {
            "model": "macro", "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": r["prompt"]}]}))
        assert chat["choices"][0]["message"]["content"] == r["expected"]
        assert chat["choices"][0]["finish_reason"] == "stop"
        assert chat["usage"]["completion_tokens"] >= 1 and chat["usage"]["prompt_tokens"] > 10

        r2 = records[1]
        raw = _post(base + "/v1/chat/completions", {
            "model": "macro", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": r2["prompt"]}]})
        events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
        assert text == r2["expected"]
        assert chunks[-1]["usage"]["completion_tokens"] >= 1
        assert any(c["choices"] and c["choices"][0]["finish_reason"] == "stop" for c in chunks)

        completion = json.loads(_post(base + "/v1/completions", {
            "model": "macro", "prompt": f"<|im_start|>user\n{r['prompt']}<|im_end|>\n"}))
        assert completion["choices"][0]["text"] == r["expected"]
        unknown = json.loads(_post(base + "/v1/completions", {"model": "macro", "prompt": "Tell me a joke."}))
        assert unknown["choices"][0]["text"] == macro_standin.UNKNOWN

        with urllib.request.urlopen(base + "/stats", timeout=10) as s:
            assert json.load(s) == {"requests": 4, "chat": 2, "completions": 2}
    finally:
        server.shutdown()
