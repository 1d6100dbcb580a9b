#!/usr/bin/env python3
"""The cascade benchmark's "macro" model: an OpenAI-compatible server that answers
every prompt of the labelled set (bench/cascade/labelled_set.jsonl) with its
expected answer, so that the benchmark measures how well ferrite's confidence
signal finds the micro model's own mistakes (a perfect macro model: every
escalation of a wrong micro answer fixes it).

  POST /v1/chat/completions   the last user message is looked up (streaming or not)
  POST /v1/completions        a labelled prompt contained in `prompt` is looked up
  GET  /v1/models, /health    for readiness checks
  GET  /stats                 requests answered so far, by endpoint

A prompt not in the set gets "I don't know." Usage counts tokens with the
tokenizer given (--tokenizer tokenizer.json; SmolLM2's in the benchmark) or, without
one, whitespace-separated words. Binds 127.0.0.1 only (stdlib; no dependencies).

    python bench/cascade/macro_standin.py --port 18200 [--tokenizer FILE] [--delay-ms 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import labels  # noqa: E402

UNKNOWN = "I don't know."
MODEL = "macro"


class Answers:
    """The labelled set as prompt -> expected answer, and a token counter."""

    def __init__(self, records: list[dict], tokenizer_path: Path | None = None):
        self.by_prompt = {r["prompt"]: r["expected"] for r in records}
        self.encode = self.decode = None
        if tokenizer_path is not None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tokenizer_path))
            self.encode = lambda s: tok.encode(s, add_special_tokens=False).ids
            self.decode = tok.decode

    def lookup(self, text: str) -> str:
        """The expected answer of the labelled prompt `text` is (or contains)."""
        text = text.strip()
        if text in self.by_prompt:
            return self.by_prompt[text]
        # completions: the prompt may carry a template around the question
        for prompt, answer in self.by_prompt.items():
            if prompt in text:
                return answer
        return UNKNOWN

    def pieces(self, text: str) -> list[str]:
        """The answer as streamed pieces: tokens, or words."""
        if self.encode is None:
            words = text.split(" ")
            return [w if i == 0 else " " + w for i, w in enumerate(words)]
        out, ids = [], self.encode(text)
        # decode prefixes so multi-byte characters stay whole
        done = ""
        for i in range(1, len(ids) + 1):
            now = self.decode(ids[:i])
            if now.startswith(done) and len(now) > len(done):
                out.append(now[len(done):])
                done = now
        return out or [text]

    def count(self, text: str) -> int:
        return len(self.encode(text)) if self.encode else len(text.split())

    def chat_prompt_tokens(self, messages: list[dict]) -> int:
        """Prompt tokens of a chat request, counted as OpenAI documents for its
        chat models: each message's content plus 3, plus 3 for the reply."""
        return sum(self.count(str(m.get("content") or "")) + 3 for m in messages) + 3


def make_handler(answers: Answers, delay_s: float, stats: dict, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - quiet: the benchmark reads /stats
            pass

        def send_json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path in ("/health", "/v1/health"):
                self.send_json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]})
            elif self.path == "/stats":
                with lock:
                    self.send_json(200, dict(stats))
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("content-length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as e:
                self.send_json(400, {"error": {"message": f"body is not JSON: {e}", "type": "invalid_request_error"}})
                return
            if self.path == "/v1/chat/completions":
                messages = body.get("messages") or []
                users = [m.get("content") for m in messages if m.get("role") == "user"]
                text = users[-1] if users and isinstance(users[-1], str) else ""
                prompt_tokens = answers.chat_prompt_tokens(messages)
                kind = "chat"
            elif self.path == "/v1/completions":
                text = body.get("prompt") or ""
                text = text if isinstance(text, str) else " ".join(map(str, text))
                prompt_tokens = answers.count(text)
                kind = "completions"
            else:
                self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            with lock:
                stats[kind] = stats.get(kind, 0) + 1
                stats["requests"] = stats.get("requests", 0) + 1
            answer = answers.lookup(text)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": answers.count(answer),
                     "total_tokens": prompt_tokens + answers.count(answer)}
            if delay_s:
                time.sleep(delay_s)
            model = body.get("model") or MODEL
            rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:16]}"
            created = int(time.time())
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self.stream(kind, rid, created, model, answers.pieces(answer), usage if include_usage else None)
                return
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "logprobs": None,
                          "finish_reason": "stop"}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}
                obj = "text_completion"
            self.send_json(200, {"id": rid, "object": obj, "created": created, "model": model,
                                 "choices": [choice], "usage": usage})

        def stream(self, kind, rid, created, model, pieces, usage):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def event(choices, extra=None):
                payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
                payload.update(extra or {})
                data = f"data: {json.dumps(payload)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            for i, piece in enumerate(pieces):
                if kind == "chat":
                    delta = {"content": piece} if i else {"role": "assistant", "content": piece}
                    event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
                else:
                    event([{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}])
            last = ({"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"} if kind == "chat"
                    else {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"})
            event([last])
            if usage is not None:
                event([], {"usage": usage})
            done = b"data: [DONE]\n\n"
            self.wfile.write(f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n")
            self.wfile.flush()

    return Handler


def serve(port: int, records: list[dict], tokenizer: Path | None = None, delay_ms: float = 0.0):
    """A running stand-in on 127.0.0.1:`port` (0: a free port; see
    `server.server_address`), served from a daemon thread. Stop it with
    `server.shutdown()`."""
    answers = Answers(records, tokenizer)
    stats, lock = {"requests": 0}, threading.Lock()
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(answers, delay_ms / 1e3, stats, lock))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=18200)
    ap.add_argument("--set", type=Path, default=labels.SET, help="the labelled set (JSON lines)")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.json to count and stream tokens with")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="wait before answering (an API's latency)")
    a = ap.parse_args()
    server = serve(a.port, labels.load(a.set), a.tokenizer, a.delay_ms)
    print(f"macro stand-in on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
