"""A small reference decoder loop over a ferrite LLM model directory (docs/llm.md).

Used by models/test_converter.py and models/bench_graph.py; it is the Python twin of
what the Rust engine does: left-padded batches, per-row position_ids, a KV cache per
layer, greedy decoding.

  python models/llm_reference.py .cache/models/smollm2-135m-instruct-int4 "What is the capital of France?"
"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort


class OnnxLlm:
    def __init__(self, model_dir, threads=2, spin=True):
        self.dir = model_dir
        with open(os.path.join(model_dir, "llm.json")) as f:
            self.cfg = json.load(f)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sess = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), so,
                                         providers=["CPUExecutionProvider"])
        self.L = self.cfg["num_layers"]
        self.kv = self.cfg["num_kv_heads"]
        self.hd = self.cfg["head_dim"]
        self.out_names = [o.name for o in self.sess.get_outputs()]
        self._tok = None

    # -- text ---------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(os.path.join(self.dir, "tokenizer.json"))
        return self._tok

    def chat_prompt(self, messages, add_generation_prompt=True):
        import jinja2

        with open(os.path.join(self.dir, "chat_template.jinja")) as f:
            tpl = jinja2.Environment(keep_trailing_newline=True).from_string(f.read())
        return tpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                          bos_token="", eos_token="")

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- graph --------------------------------------------------------------------
    def empty_past(self, batch):
        z = np.zeros((batch, self.kv, 0, self.hd), np.float32)
        return [z] * (2 * self.L)

    def step(self, input_ids, attention_mask, position_ids, past):
        feeds = {"input_ids": np.asarray(input_ids, np.int64),
                 "attention_mask": np.asarray(attention_mask, np.int64),
                 "position_ids": np.asarray(position_ids, np.int64)}
        for i in range(self.L):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outs = self.sess.run(self.out_names, feeds)
        return outs[0][:, -1, :], outs[1:]

    def prefill(self, rows):
        """rows: list of token-id lists; left-padded into one batch.
        Returns (last logits [B, V], past, attention_mask, next positions [B])."""
        n = max(len(r) for r in rows)
        pad = self.cfg["pad_token_id"]
        ids = np.full((len(rows), n), pad, np.int64)
        mask = np.zeros((len(rows), n), np.int64)
        pos = np.zeros((len(rows), n), np.int64)
        for b, r in enumerate(rows):
            ids[b, n - len(r):] = r
            mask[b, n - len(r):] = 1
            pos[b, n - len(r):] = np.arange(len(r))
        logits, past = self.step(ids, mask, pos, self.empty_past(len(rows)))
        return logits, past, mask, np.array([len(r) for r in rows], np.int64)

    def greedy(self, rows, max_new_tokens, stop_at_eos=False):
        """Greedy continuation of every row (left-padded batch). Returns list of token lists."""
        logits, past, mask, nxt = self.prefill(rows)
        out = [[] for _ in rows]
        eos = set(self.cfg["eos_token_ids"])
        done = np.zeros(len(rows), bool)
        for _ in range(max_new_tokens):
            tok = logits.argmax(-1)
            for b, t in enumerate(tok):
                if not done[b]:
                    out[b].append(int(t))
                    if stop_at_eos and int(t) in eos:
                        done[b] = True
            if done.all() or len(out[0]) >= max_new_tokens and all(len(o) >= max_new_tokens or done[b]
                                                                   for b, o in enumerate(out)):
                break
            mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
            logits, past = self.step(tok[:, None], mask, nxt[:, None], past)
            nxt = nxt + 1
        return out

    def teacher_forced(self, prompt, continuation):
        """Logits [len(continuation), V] predicting each continuation token, fed one by one."""
        logits, past, mask, nxt = self.prefill([prompt])
        res = [logits[0]]
        for t in continuation[:-1]:
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            logits, past = self.step(np.array([[t]]), mask, nxt[:, None], past)
            nxt = nxt + 1
            res.append(logits[0])
        return np.stack(res)

    def chat(self, question, max_new_tokens=32):
        ids = self.encode(self.chat_prompt([{"role": "user", "content": question}]))
        toks = self.greedy([ids], max_new_tokens, stop_at_eos=True)[0]
        return self.decode(toks)


def main():
    d = sys.argv[1]
    q = sys.argv[2] if len(sys.argv) > 2 else "What is the capital of France?"
    m = OnnxLlm(d)
    t = time.time()
    print(m.chat(q, 48))
    print(f"({time.time() - t:.2f}s)")


if __name__ == "__main__":
    main()
