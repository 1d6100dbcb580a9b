"""The texts of `make bench-embed` (bench/embed_bench.py): deterministic
English-like sentences from a fixed vocabulary of common words (each one
WordPiece token in BERT's uncased vocabulary), so that a "short" text is
about 12 tokens and a "long" one about 200 with [CLS] and [SEP]. Every run,
every peer and every client gets the same texts; the token counts measured
with the model's own tokenizer go into the results.
"""

from __future__ import annotations

import random

# Common words, one WordPiece each; no punctuation that would add tokens.
WORDS = """
the of and to in is was for on that with as by at from his it an were are which this be or has had
not but also their they one its new first after two been who more other all time year when there
into over only most some would can city many about world such later may made school three part
during under between these then people state used area since well where both while team years
known called season including high national number before several second through early film
family work war music series album county river game born group during life place like home
found left best three house water small large order public until still began along same final
local power following around left form name day band long line last north south west east back
major main set based named late held four within each large major song player club church road
top old without river point member end side great general town early use city light field union
""".split()
KINDS = {"short": 10, "long": 198}  # words per text: ~12 and ~200 tokens with [CLS] and [SEP]
POOL = 512  # distinct texts per kind: requests cycle through them


def texts(kind: str, n: int = POOL, seed: int = 16) -> list[str]:
    """`n` distinct texts of the given kind ("short" or "long")."""
    rng = random.Random(f"{seed}-{kind}")
    words = KINDS[kind]
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def token_counts(tokenizer_json: str, kind: str) -> dict:
    """Mean, min and max token counts of the texts of `kind` with the
    model's tokenizer (special tokens included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_truncation()
    lengths = [len(e.ids) for e in tok.encode_batch(texts(kind))]
    return {"mean": round(sum(lengths) / len(lengths), 1), "min": min(lengths), "max": max(lengths)}
