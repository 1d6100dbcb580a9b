#!/usr/bin/env python3
"""The module graph of a crate, from its `crate::` paths: prints each
module's dependencies, then checks that there is no cycle and that no module
reaches up to a higher layer.

    python3 scripts/module_graph.py            # both crates, with the layers below
    python3 scripts/module_graph.py --dot      # Graphviz of both

A module is a top-level module of the crate (a file or directory under
src/); `crate::llm::oip` counts as `llm`. Tests (`#[cfg(test)]` blocks and
tests.rs files) are left out: they may reach anywhere.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Per crate, its layers, highest first. A module may use modules of its own
# layer or lower ones.
SERVER = [
    ["main", "server", "untrusted"],  # untrusted: the fuzz harness over the frontends' decoders
    ["grpc", "http", "auth", "tls", "transport"],  # frontends, and what guards their ports
    ["state", "describe"],
    ["repository"],
    ["model"],
    ["tensor_model", "llm", "encoder", "cascade"],  # backends (the cascade wraps an LLM's)
    ["backend", "scheduler", "admission", "batch", "budget"],
    ["config", "stats", "metrics", "inference", "policy"],
    ["runtime"],  # the only user of ONNX Runtime
    ["tensor", "error", "keyed_lock"],
    ["lib"],
]
OPERATOR = [
    ["main", "run"],
    # the activator: a data-path proxy of its own (`ferrite-operator
    # activator`), reading the resource and its pods' labels, never the loops
    ["activator"],
    # the control loops: reconcile; scrape -> decide -> scale; the escalation
    # status that reconcile reads from the pods' metrics
    ["reconcile", "autoscale", "escalation"],
    ["status"],
    ["resources"],  # builders of the owned objects (access, network_policy, replicas inside)
    ["policy", "telemetry"],
    ["leader"],  # the Lease and the fence on leader-only writes
    ["crd", "health"],
    ["lib"],
]
CRATES = {"server": SERVER, "operator": OPERATOR}

USE = re.compile(r"\bcrate::(\w+)")


def module_of(src: Path, path: Path) -> str:
    return path.relative_to(src).parts[0].removesuffix(".rs")


def code(text: str) -> str:
    """The code up to the first `#[cfg(test)]` (test modules come last),
    without comments (doc links name modules too)."""
    lines = text.split("#[cfg(test)]", 1)[0].splitlines()
    return "\n".join(line.split("//", 1)[0] for line in lines)


def graph(src: Path) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(src.rglob("*.rs")):
        if path.name == "tests.rs":
            continue
        module = module_of(src, path)
        uses = {m for m in USE.findall(code(path.read_text())) if m != module}
        edges.setdefault(module, set()).update(uses)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def upward(edges: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    layer = {module: depth for depth, modules in enumerate(layers) for module in modules}
    bad = []
    for module, uses in sorted(edges.items()):
        for used in sorted(uses):
            if module not in layer or used not in layer:
                bad.append(f"{module} -> {used}: module not placed in a layer (scripts/module_graph.py)")
            elif layer[used] < layer[module]:
                bad.append(f"{module} -> {used}: a lower layer reaches up")
    return bad


def main() -> int:
    failed = False
    for crate, layers in CRATES.items():
        edges = graph(ROOT / crate / "src")
        if "--dot" in sys.argv:
            print(f"digraph {crate} {{")
            for module, uses in sorted(edges.items()):
                print("".join(f'  "{module}" -> "{used}";\n' for used in sorted(uses)), end="")
            print("}")
            continue
        rank = {module: depth for depth, modules in enumerate(layers) for module in modules}
        print(f"{crate}/src:")
        for module in sorted(edges, key=lambda m: (rank.get(m, -1), m)):
            print(f"  {module:13} -> {', '.join(sorted(edges[module])) or '-'}")
        problems = [" -> ".join(c) + ": cycle" for c in cycles(edges)] + upward(edges, layers)
        for problem in problems:
            print(f"PROBLEM in {crate}: {problem}", file=sys.stderr)
        print(f"  {len(edges)} modules, {sum(map(len, edges.values()))} dependencies: "
              f"{'no cycle, no upward dependency' if not problems else f'{len(problems)} problems'}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
