"""The report's sections on what clients we did not write see (ghz, oha)
and on the protocol floor (bench/floor): split from bench/report.py."""

from __future__ import annotations

from pathlib import Path

from report import CLIENT_NAMES, LOADGEN, ms, ratio, rps, throughput_panel


def outside_clients_section(data: dict, cell, thr, out_dir: Path) -> str:
    """ferrite against Triton on the tiny MLP as each client sees it, with a
    plot of throughput by client."""
    clients = [c for c in data.get("clients", [LOADGEN]) if c != LOADGEN]
    conc = data["concurrency"]
    if not clients or not any(cell("mlp", c, "ferrite", client) for c in conc for client in clients):
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everyone = [LOADGEN] + clients
    fig, axes = plt.subplots(1, len(everyone), figsize=(4.5 * len(everyone), 4), squeeze=False)
    for ax, client in zip(axes[0], everyone):
        throughput_panel(ax, conc, CLIENT_NAMES.get(client, client), [
            (config, ":" if config == "floor" else "-", [(c, thr("mlp", c, config, client)) for c in conc])
            for config in ("ferrite", "triton", "floor")])
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Tiny MLP: ferrite, Triton and the protocol floor as each client sees them")
    fig.tight_layout()
    fig.savefig(out_dir / "bench-clients.png", dpi=110)
    plt.close(fig)

    out = ["## What clients we did not write see\n",
           "The same servers and model (tiny MLP; ferrite with batching, Triton with its dynamic batcher), driven in "
           "the same interleaved run by load generators we did not write: "
           "[ghz](https://ghz.sh) (`bench/bench.mk` builds it from its Go module; grpc-go, the client of most Go "
           "microservices; its defaults: one connection, binary `ModelInferRequest` with raw contents) and "
           "[oha](https://github.com/hatoo/oha) (from crates.io; KServe v2 JSON over HTTP/1.1, one kept-alive "
           "connection per worker). Each runs a warm-up, then the measured window; calls cut by the end of the window "
           "are not counted as failures. `bench/outside_clients.py` runs them. The plot also shows the protocol floor "
           "(dotted; see below) where it was measured.\n",
           "![throughput by client](bench-clients.png)\n",
           "| client | conc. | ferrite req/s | p50 | p99 | Triton req/s | p50 | p99 | ferrite / Triton | failed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for client in everyone:
        for c in conc:
            f, t = cell("mlp", c, "ferrite", client), cell("mlp", c, "triton", client)
            if not (f or t):
                continue
            fig_ = lambda r: (rps(r["throughput_rps"]), ms(r["p50_us"]), ms(r["p99_us"])) if r else ("-",) * 3  # noqa: E731
            failed = sum(r["failed"] for r in (f, t) if r)
            out.append(f"| {client} | {c} | {' | '.join(fig_(f))} | {' | '.join(fig_(t))} | "
                       f"{ratio(f and f['throughput_rps'], t and t['throughput_rps'])} | {failed} |")
    ghz = {c: (thr("mlp", c, "ferrite", "ghz"), thr("mlp", c, "triton", "ghz")) for c in (1, 8, 64)}
    if all(f and t for f, t in ghz.values()):
        ok = all(f >= t for f, t in ghz.values()) and ghz[64][0] >= 3 * ghz[64][1]
        out.append(f"\nTarget of issue 10, *with ghz, ferrite at least 1x Triton at every concurrency and at least 3x "
                   f"at 64*: **{'met' if ok else 'not met'}** ("
                   + ", ".join(f"c={c} {f / t:.2f}x" for c, (f, t) in ghz.items()) + ").")
    return "\n".join(out) + "\n"


FLOOR_METHOD = """
  - *protocol floor (fixed answer)*, tiny MLP only: `ferrite-floor` (`bench/floor`), a bare tonic (gRPC) and axum
    (HTTP) server with ferrite-server's transport settings (TCP_NODELAY, tonic's HTTP/2 defaults, the same message
    limits) that decodes each request and answers it with one precomputed response of the same names, shapes and
    sizes as ferrite's: no queue, no model. What ferrite measures above it is ours."""
# Future targets (issue 11): ferrite's overhead over the gRPC / HTTP stack itself.
FLOOR_P50_US = 30
FLOOR_THROUGHPUT = 0.9


def floor_section(data: dict, cell) -> str:
    """ferrite (with batching) against the protocol floor on the tiny MLP,
    one table per client, with the future targets of issue 11."""
    conc = data["concurrency"]
    clients = [c for c in data.get("clients", [LOADGEN]) if any(cell("mlp", x, "floor", c) for x in conc)]
    out = ["## The protocol floor\n"]
    if not clients:
        out.append("Not measured in this run: `make bench` measures it (configuration `floor`, tiny MLP only; "
                   "`bench/floor`).\n")
        return "\n".join(out)
    out.append("How much of ferrite's latency and throughput on the tiny MLP is the gRPC / HTTP stack itself: "
               "`ferrite-floor` (`bench/floor`) speaks the same protocol on the same transport settings (tonic, "
               "hyper, TCP_NODELAY, the same message limits) and answers every request with one precomputed response "
               "shaped like ferrite's, with no queue and no model, under the same clients in the same interleaved "
               "run. The gap between ferrite (with batching) and the floor is ours: decoding into tensors, the "
               "queue and batcher, ONNX Runtime, encoding. Figures move by about 10% from run to run on this "
               "machine, and at concurrency 64 the client shares the same CPUs: where ferrite comes out above the "
               "floor, the client (or noise), not the server, set the pace of that cell.\n")
    for client in clients:
        out += [f"**{CLIENT_NAMES.get(client, client)}**\n",
                "| conc. | ferrite req/s | ferrite p50 | floor req/s | floor p50 | ferrite / floor req/s | "
                "p50 ferrite - floor |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        for c in conc:
            f, x = cell("mlp", c, "ferrite", client), cell("mlp", c, "floor", client)
            if not (f or x):
                continue
            fig_ = lambda r: (rps(r["throughput_rps"]), ms(r["p50_us"])) if r else ("-", "-")  # noqa: E731
            gap = f"{f['p50_us'] - x['p50_us']:+,.0f} µs" if f and x else "-"
            out.append(f"| {c} | {' | '.join(fig_(f))} | {' | '.join(fig_(x))} | "
                       f"{ratio(f and f['throughput_rps'], x and x['throughput_rps'])} | {gap} |")
        out.append("\n" + floor_targets(cell, client) + "\n")
    return "\n".join(out)


def floor_targets(cell, client: str) -> str:
    """The two future targets against the floor, as one client saw them."""
    def verdict(ok: bool | None) -> str:
        return "**not measured**" if ok is None else ("**met**" if ok else "**not met**")

    f1, x1 = cell("mlp", 1, "ferrite", client), cell("mlp", 1, "floor", client)
    gap = f1["p50_us"] - x1["p50_us"] if f1 and x1 else None
    f64, x64 = cell("mlp", 64, "ferrite", client), cell("mlp", 64, "floor", client)
    share = f64["throughput_rps"] / x64["throughput_rps"] if f64 and x64 and x64["throughput_rps"] else None
    return (f"Targets (future, issue 11): *c=1 p50 within {FLOOR_P50_US} µs of the floor*: "
            f"{verdict(None if gap is None else gap <= FLOOR_P50_US)}"
            + (f" ({gap:+,.0f} µs)" if gap is not None else "")
            + f"; *c=64 throughput at least {FLOOR_THROUGHPUT}x the floor*: "
            f"{verdict(None if share is None else share >= FLOOR_THROUGHPUT)}"
            + (f" ({share:.2f}x)" if share is not None else "") + ".")
