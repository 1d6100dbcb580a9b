#!/usr/bin/env python3
"""Record what Hugging Face transformers answers for the tiny random-weight GGUF of each
LLM family (models/tiny_gguf.py); models/test_families.py checks the converted ONNX
graphs against it. Run ONCE by hand in a side venv (torch is not in the test venv):

  python3 -m venv /tmp/fixtures-venv
  /tmp/fixtures-venv/bin/pip install torch==2.15.0 transformers==5.23.0 accelerate==1.15.0 gguf==0.19.0 numpy==2.2.6
  /tmp/fixtures-venv/bin/python models/record_families.py

transformers loads each GGUF itself, tokenizer included (`gguf_file=`: its own dequantization, Q/K
un-permutation, Gemma norm offset, fused Phi-3 tensors). A few settings are not in
transformers' GGUF metadata mapping; they are set on its config from the same values
the GGUF carries (or, for Llama 3's rope scaling, which GGUF stores as the `rope_freqs`
tensor, from the Hugging Face config that tensor was computed from):
Gemma 2's soft-caps and query scale, Phi-3's sliding window.

Writes models/fixtures/families.json (prompts, token ids, greedy tokens, GGUF sha256s)
and models/fixtures/families_logits.npz (top-64 logits at every greedy step).
"""
import hashlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
FIX = os.path.join(HERE, "fixtures")

import tiny_gguf  # noqa: E402
from record_fixtures import PROMPTS  # noqa: E402

GREEDY = 16
TOPK = 64
# Texts only tokenized (and decoded back): spaces, newlines, digits, bytes outside the vocabulary.
TOKENIZER_TEXTS = [
    "  two  spaces, a tab\tand\n\nnew lines",
    "Numbers 12345 and 3.14159; words don't split",
    "Accents caf\u00e9 na\u00efve, emoji \U0001F642 and \u4e2d\u6587",
    " leading space",
]


def prompt_ids(family, tok, kind, text):
    """The prompt text and ids as the server builds them: the GGUF's chat template rendered
    with an empty bos_token, then BOS put before the ids when add_bos_token is set.
    tok: transformers' tokenizer built from the GGUF (its own conversion of the vocabulary)."""
    import jinja2

    f = tiny_gguf.FAMILIES[family]
    if kind == "chat":
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
        prompt = env.from_string(f["template"]).render(messages=[{"role": "user", "content": text}],
                                                       add_generation_prompt=True, bos_token="", eos_token="")
    else:
        prompt = text
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if f["add_bos"]:
        ids = [tok.convert_tokens_to_ids(f["bos"])] + ids
    return prompt, ids


def config_overrides(family, path):
    """Settings transformers' GGUF loader leaves at its defaults, from the GGUF itself."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()

    def key(name):
        fld = r.fields.get(f"{arch}.{name}")
        return None if fld is None else fld.contents()

    if family == "gemma2":
        return {"attn_logit_softcapping": float(key("attn_logit_softcapping")),
                "final_logit_softcapping": float(key("final_logit_softcapping")),
                "query_pre_attn_scalar": int(key("attention.key_length")),
                "hidden_activation": "gelu_pytorch_tanh"}
    if family == "phi3":
        return {"sliding_window": int(key("attention.sliding_window"))}
    if family == "llama3":
        rope = dict(tiny_gguf.FAMILIES["llama3"]["llama3_rope"])
        return {"rope_parameters": {"rope_type": "llama3", "rope_theta": float(key("rope.freq_base")), **rope}}
    return {}


def record(family, workdir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(workdir, f"tiny-{family}.gguf")
    tiny_gguf.write(family, path)
    with open(path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    tok = AutoTokenizer.from_pretrained(workdir, gguf_file=os.path.basename(path))
    overrides = config_overrides(family, path)
    cfg = AutoConfig.from_pretrained(workdir, gguf_file=os.path.basename(path))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model, info = AutoModelForCausalLM.from_pretrained(workdir, gguf_file=os.path.basename(path), config=cfg,
                                                       dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
    missing = [k for k in info["missing_keys"] if "rotary" not in k]
    assert not missing and not info["unexpected_keys"], f"{family}: weights not loaded: {info}"
    if family == "mistral":
        # GGUF writes Mistral as `llama`; transformers' own GGUF path to MistralForCausalLM
        # (general.name "mistral") fails with gguf 0.19, so its weights move into one here
        from transformers import MistralConfig, MistralForCausalLM

        mc = MistralConfig(**{k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")},
            rope_parameters=cfg.rope_parameters, sliding_window=None, attn_implementation="eager")
        mistral = MistralForCausalLM(mc).to(torch.float32)
        result = mistral.load_state_dict(model.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys, result
        model = mistral
    model.eval()
    print(f"== {family}: {type(model).__name__}, sha256 {sha[:16]}, overrides {overrides}", flush=True)
    records, arrays = [], {}
    for i, (kind, text) in enumerate(PROMPTS):
        prompt, ids = prompt_ids(family, tok, kind, text)
        cur = torch.tensor([ids])
        gen, past, tops, vals = [], None, [], []
        with torch.no_grad():
            for _ in range(GREEDY):
                out = model(input_ids=cur, past_key_values=past, use_cache=True)
                past = out.past_key_values
                last = out.logits[0, -1].float().numpy()
                top = np.argsort(-last, kind="stable")[:TOPK]
                tops.append(top)
                vals.append(last[top])
                nxt = int(last.argmax())
                gen.append(nxt)
                cur = torch.tensor([[nxt]])
        arrays[f"{family}.p{i}.ids"] = np.array(tops, np.int32)
        arrays[f"{family}.p{i}.logits"] = np.array(vals, np.float32)
        records.append({"kind": kind, "text": text, "prompt": prompt, "prompt_ids": ids, "greedy": gen})
        print(f"  [{i}] {len(ids)} prompt tokens -> {gen}", flush=True)
    texts = []
    for t in TOKENIZER_TEXTS:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        texts.append({"text": t, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    return {"gguf_sha256": sha, "tokenizer_texts": texts, "gguf_bytes": os.path.getsize(path), "hf_class": type(model).__name__,
            "config_overrides": overrides, "prompts": records}, arrays


def main():
    import torch
    import transformers

    torch.set_num_threads(2)
    torch.manual_seed(0)
    families, arrays = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for family in tiny_gguf.FAMILIES:
            families[family], arr = record(family, d)
            arrays.update(arr)
    from importlib.metadata import version

    meta = {"tool": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
            "gguf": version("gguf"), "python": platform.python_version(), "dtype": "float32",
            "attn_implementation": "eager", "greedy_steps": GREEDY, "topk": TOPK,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": "families_logits.npz: <family>.p<N>.ids / .logits, [greedy step, top-64] of "
                    "transformers' logits at each greedy step (step 0: the prompt's last position)"}
    os.makedirs(FIX, exist_ok=True)
    with open(os.path.join(FIX, "families.json"), "w") as fh:
        json.dump({"meta": meta, "families": families}, fh, indent=1)
    np.savez_compressed(os.path.join(FIX, "families_logits.npz"), **arrays)


if __name__ == "__main__":
    main()
