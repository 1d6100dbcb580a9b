#!/usr/bin/env python3
"""Small random-weight GGUF files, one per LLM family the converter knows.

Each file is what llama.cpp's convert_hf_to_gguf.py would write for a (tiny) Hugging
Face model of that family: its architecture name, metadata keys and tensor names, Q/K
rows permuted for the `llama` architecture, Gemma's norms stored as 1 + w, Phi-3's
fused qkv and gate_up projections, Llama 3's rope scaling as a `rope_freqs` tensor.
Weights come from a fixed seed and every tensor is float32, so a file is the same, byte
for byte, wherever it is written (models/fixtures/families.json keeps each sha256).

The tokenizer is a toy byte-level BPE (the 256 byte symbols, merges learned by a tiny
deterministic trainer on a fixed text, the family's special tokens) with the family's
own pre-tokenizer name and chat template, so the converter's tokenizer and template
paths run too.

  python models/tiny_gguf.py FAMILY OUT.gguf      # FAMILY: one of FAMILIES
"""
import math
import re
import sys
from collections import Counter

import numpy as np
from gguf import GGUFWriter

SEED = 20261203
N_MERGES = 96
# Output projections larger than unit gain: each layer's update outweighs the token's own
# embedding, so a tied LM head does not just repeat the last token.
OUT_SCALE = 3.0

# The text the toy BPE learns its merges from (and that the fixture prompts resemble).
CORPUS = (
    "What is the capital of France? The capital of France is Paris. "
    "Write a short poem about the sea. The sea is wide and the waves are blue. "
    "In 1969, the Apollo 11 mission landed on the Moon. The astronauts were the first "
    "to walk on the Moon. The quick brown fox jumps over the lazy dog. "
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    "You are a helpful assistant. List three tips for staying healthy: sleep, water, walk."
)

QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}"
    "{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Per family: the GGUF architecture, shapes, and what makes the family itself.
FAMILIES = {
    "qwen2": dict(arch="qwen2", name="tiny-qwen2.5", hidden=64, heads=4, kv=2, head_dim=16, ffn=160, layers=3,
                  theta=1e6, eps=1e-6, tied=True, qkv_bias=True, pre="qwen2", template=QWEN_TEMPLATE,
                  specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                  pad="<|endoftext|>", add_bos=False),
    "phi3": dict(arch="phi3", name="tiny-phi3", hidden=96, heads=4, kv=2, head_dim=24, ffn=128, layers=3,
                 theta=1e4, eps=1e-5, tied=False, fused=True, sliding_window=32, pre="default", template=PHI3_TEMPLATE,
                 spm_front=["<unk>", "<s>", "</s>"],
                 specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                 bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", add_bos=False),
    "gemma2": dict(arch="gemma2", name="tiny-gemma2", hidden=64, heads=4, kv=2, head_dim=32, ffn=128, layers=4,
                   theta=1e4, eps=1e-6, tied=True, sliding_window=16, attn_softcap=5.0, final_softcap=8.0,
                   pre="default", template=GEMMA_TEMPLATE, space_runs=["  ", "   "],
                   spm_front=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
                   specials=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
                   bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True),
    "mistral": dict(arch="llama", name="tiny-mistral", hidden=64, heads=8, kv=2, head_dim=8, ffn=160, layers=3,
                    theta=1e6, eps=1e-5, tied=False, permute=True, pre="default", template=MISTRAL_TEMPLATE,
                    spm_front=["<unk>", "<s>", "</s>"], specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>", pad="</s>",
                    add_bos=True),
    "llama3": dict(arch="llama", name="tiny-llama3", hidden=64, heads=4, kv=1, head_dim=16, ffn=128, layers=3,
                   theta=5e5, eps=1e-5, tied=True, permute=True, pre="llama-bpe", template=LLAMA3_TEMPLATE,
                   llama3_rope=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=64),
                   specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>",
                   add_bos=True),
}
CONTEXT = 128


def bytes_to_unicode():
    """GPT-2's map from bytes to printable characters (byte-level BPE's symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def toy_bpe(n_merges=N_MERGES):
    """(tokens, merges): 256 byte symbols then n_merges merges learned greedily on CORPUS
    (most frequent pair first, ties broken by the pair's text), pure Python so the result
    never depends on a library's version."""
    b2u = bytes_to_unicode()
    words = Counter(re.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", CORPUS))
    seqs = {w: tuple(b2u[b] for b in w.encode()) for w in words}
    tokens = [b2u[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, s in seqs.items():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], tuple(-ord(c) for c in kv[0][0] + "\0" + kv[0][1])))[0]
        merges.append(best)
        tokens.append(best[0] + best[1])
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)
    return tokens, [f"{a} {b}" for a, b in merges]


def toy_spm(front, back, space_runs=(), n_merges=N_MERGES):
    """(tokens, scores, types) of a SentencePiece-style BPE vocabulary (`tokenizer.ggml.model`
    llama): `front` tokens, the 256 byte-fallback tokens <0xNN>, `space_runs` (Gemma spells runs
    of spaces as spaces), the merged pieces in merge order (score -rank), the single characters
    of CORPUS, then `back`. Merges are learned on CORPUS with spaces written as U+2581."""
    mark = "\u2581"
    text = mark + CORPUS.replace(" ", mark)
    words = Counter(re.findall(mark + "*[^" + mark + "]+|" + mark + "+", text))
    seqs = {w: tuple(w) for w in words}
    chars = sorted({c for c in text if c != "\n"})
    pieces = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, sq in seqs.items():
            for a, b in zip(sq, sq[1:]):
                if "\n" not in a + b:
                    pairs[(a, b)] += words[w]
        best = max(pairs.items(), key=lambda kv: (kv[1], tuple(-ord(c) for c in kv[0][0] + "\0" + kv[0][1])))[0]
        pieces.append(best[0] + best[1])
        for w, sq in seqs.items():
            out, i = [], 0
            while i < len(sq):
                if i + 1 < len(sq) and (sq[i], sq[i + 1]) == best:
                    out.append(sq[i] + sq[i + 1])
                    i += 2
                else:
                    out.append(sq[i])
                    i += 1
            seqs[w] = tuple(out)
    runs = {mark * len(r) for r in space_runs}  # already in the vocabulary, spelled with spaces
    pieces = [p for p in dict.fromkeys(pieces) if p not in chars and p not in runs]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = list(front) + byte_tokens + list(space_runs) + pieces + chars + list(back)
    scores = ([0.0] * (len(front) + 256 + len(space_runs)) + [-float(i) for i in range(len(pieces))]
              + [-float(len(pieces) + j) for j in range(len(chars))] + [0.0] * len(back))
    types = ([2 if t == "<unk>" else 3 for t in front] + [6] * 256 + [1] * (len(space_runs) + len(pieces) + len(chars))
             + [3] * len(back))
    return tokens, scores, types


def vocabulary(f):
    """(tokens, scores or None, types, merges or None) of a family's toy tokenizer."""
    if f.get("spm_front") is not None:
        back = [t for t in f["specials"] if t not in f["spm_front"]]
        tokens, scores, types = toy_spm(f["spm_front"], back, f.get("space_runs", ()))
        return tokens, scores, types, None
    tokens, merges = toy_bpe()
    tokens = tokens + f["specials"]
    return tokens, None, [1] * (len(tokens) - len(f["specials"])) + [3] * len(f["specials"]), merges


def permute(w, n_head):
    """llama.cpp's Q/K row order for the `llama` architecture (its rotary rotates pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta, head_dim, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """The `rope_freqs` tensor llama.cpp writes for Llama 3.1's rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wl = original_max_position_embeddings / low_freq_factor
    high_wl = original_max_position_embeddings / high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def write(family, path):
    """Writes the tiny GGUF of `family` to `path`."""
    f = FAMILIES[family]
    arch, H, nh, nkv, hd, ffn, L = f["arch"], f["hidden"], f["heads"], f["kv"], f["head_dim"], f["ffn"], f["layers"]
    rng = np.random.default_rng([SEED, sorted(FAMILIES).index(family)])
    tokens, scores, types, merges = vocabulary(f)
    V = len(tokens)

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols)) * scale / math.sqrt(cols)).astype(np.float32)

    def norm(n):
        w = 1.0 + 0.1 * rng.standard_normal(n)
        return w.astype(np.float32)  # Gemma stores 1 + w: a weight near 1 either way

    w = GGUFWriter(path, arch)
    w.add_name(f["name"])
    w.add_context_length(CONTEXT)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(ffn)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(f["eps"])
    w.add_rope_freq_base(f["theta"])
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    if hd != H // nh:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if "sliding_window" in f:
        w.add_sliding_window(f["sliding_window"])
    if "attn_softcap" in f:
        w.add_attn_logit_softcapping(f["attn_softcap"])
        w.add_final_logit_softcapping(f["final_softcap"])
    w.add_tokenizer_model("gpt2" if merges is not None else "llama")
    w.add_tokenizer_pre(f["pre"])
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if "<unk>" in tokens:
        w.add_unk_token_id(tokens.index("<unk>"))
    if f["bos"]:
        w.add_bos_token_id(tokens.index(f["bos"]))
    w.add_eos_token_id(tokens.index(f["eos"]))
    w.add_pad_token_id(tokens.index(f["pad"]))
    w.add_add_bos_token(f["add_bos"])
    w.add_chat_template(f["template"])

    # A tied LM head scores the current token by its own embedding, still in the residual
    # stream: small embeddings (Gemma's are also multiplied by sqrt(hidden)) keep greedy
    # decoding from repeating one token, and a larger final norm weight gives the logits
    # the usual spread
    emb_std = {"gemma2": 0.01}.get(arch, 0.05) if f["tied"] else 1.0
    head_gain = 4.0 / (emb_std * math.sqrt(H)) if f["tied"] else 1.0
    w.add_tensor("token_embd.weight", (emb_std * rng.standard_normal((V, H))).astype(np.float32))
    if "llama3_rope" in f:
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(f["theta"], hd, **f["llama3_rope"]))
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(H))
        q, k, v = mat(nh * hd, H), mat(nkv * hd, H), mat(nkv * hd, H)
        if f.get("permute"):
            q, k = permute(q, nh), permute(k, nkv)
        if f.get("fused"):
            w.add_tensor(p + "attn_qkv.weight", np.concatenate([q, k, v]))
        else:
            w.add_tensor(p + "attn_q.weight", q)
            w.add_tensor(p + "attn_k.weight", k)
            w.add_tensor(p + "attn_v.weight", v)
        if f.get("qkv_bias"):
            for n, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
                w.add_tensor(p + f"attn_{n}.bias", (0.5 * rng.standard_normal(rows)).astype(np.float32))
        w.add_tensor(p + "attn_output.weight", mat(H, nh * hd, OUT_SCALE))
        if arch == "gemma2":
            w.add_tensor(p + "post_attention_norm.weight", norm(H))
        w.add_tensor(p + "ffn_norm.weight", norm(H))
        gate, up = mat(ffn, H), mat(ffn, H)
        if f.get("fused"):
            w.add_tensor(p + "ffn_up.weight", np.concatenate([gate, up]))
        else:
            w.add_tensor(p + "ffn_gate.weight", gate)
            w.add_tensor(p + "ffn_up.weight", up)
        w.add_tensor(p + "ffn_down.weight", mat(H, ffn, OUT_SCALE))
        if arch == "gemma2":
            w.add_tensor(p + "post_ffw_norm.weight", norm(H))
    w.add_tensor("output_norm.weight", head_gain * norm(H))
    if not f["tied"]:
        w.add_tensor("output.weight", mat(V, H, 4.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: tiny_gguf.py {{{'|'.join(FAMILIES)}}} OUT.gguf")
    write(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
