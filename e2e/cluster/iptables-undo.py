#!/usr/bin/env python3
"""Undo the cluster's iptables changes, and only those; or check that they are gone.

    iptables-undo.py undo  BEFORE {iptables|ip6tables}
    iptables-undo.py check BEFORE {iptables|ip6tables}

BEFORE is `iptables-save` output taken before the cluster started. `undo` finds
the chains that exist now but did not then and whose names the cluster uses
(KUBE-*, CNI-*, FERRITE-*), deletes the rules of the other chains that jump to
them, then flushes and deletes them: one `iptables-restore --noflush`
transaction per table. Nothing else is touched: no table is flushed, no rule
that existed before (or that another program added) is removed.

`check` compares the rules and user chains now with BEFORE and prints what is
missing (a rule from before that is gone) or left over (added and still there);
exit status 1 if anything differs.
"""

import re
import subprocess
import sys

OURS = re.compile(r"^(KUBE-|CNI-|FERRITE-)")
BUILTIN = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}


def parse(text):
    """-> {table: {"chains": {name: policy}, "rules": [line, ...]}}"""
    tables, cur = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], {"chains": {}, "rules": []})
        elif line.startswith(":"):
            name, policy = line[1:].split()[:2]
            cur["chains"][name] = policy
        elif line.startswith("-A "):
            # drop a counter prefix if `-c` was used
            cur["rules"].append(re.sub(r"^\[\d+:\d+\]\s*", "", line))
    return tables


def target(rule):
    m = re.search(r"\s-[jg]\s+(\S+)", rule)
    return m.group(1) if m else None


def chain_of(rule):
    return rule.split()[1]


def save(family):
    return subprocess.run([f"{family}-save"], check=True, capture_output=True, text=True).stdout


def undo(before, family):
    now = parse(save(family))
    for table, t in now.items():
        old_chains = set(before.get(table, {}).get("chains", {}))
        new = sorted(c for c in t["chains"] if c not in old_chains and c not in BUILTIN and OURS.match(c))
        if not new:
            continue
        newset = set(new)
        lines = [f"*{table}"]
        for r in t["rules"]:
            if chain_of(r) not in newset and target(r) in newset:
                lines.append("-D" + r[2:])
        lines += [f"-F {c}" for c in new]
        lines += [f"-X {c}" for c in new]
        lines.append("COMMIT")
        script = "\n".join(lines) + "\n"
        p = subprocess.run([f"{family}-restore", "-w", "--noflush"], input=script, text=True, capture_output=True)
        if p.returncode != 0:
            sys.stderr.write(f"{family}-restore failed for table {table}: {p.stderr}\n{script}")
            return 1
        print(f"{family} {table}: removed {len(new)} chains ({', '.join(new[:4])}{', ...' if len(new) > 4 else ''}) "
              f"and {len(lines) - 2 - 2 * len(new)} jumps to them", file=sys.stderr)
    return 0


def norm(tables):
    out = set()
    for table, t in tables.items():
        for c, pol in t["chains"].items():
            if c in BUILTIN:
                if pol not in ("ACCEPT", "-"):
                    out.add(f"{table} :{c} {pol}")
            else:
                out.add(f"{table} :{c}")
        for r in t["rules"]:
            out.add(f"{table} {r}")
    return out


def check(before, family):
    a, b = norm(before), norm(parse(save(family)))
    missing, extra = sorted(a - b), sorted(b - a)
    for line in missing:
        print(f"{family}: MISSING (was there before): {line}")
    for line in extra:
        print(f"{family}: LEFT OVER: {line}")
    if not missing and not extra:
        print(f"{family}: rules and chains identical to before ({len(a)} entries)", file=sys.stderr)
    return 1 if missing or extra else 0


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("undo", "check") or sys.argv[3] not in ("iptables", "ip6tables"):
        sys.exit(__doc__)
    with open(sys.argv[2]) as f:
        before = parse(f.read())
    sys.exit((undo if sys.argv[1] == "undo" else check)(before, sys.argv[3]))


if __name__ == "__main__":
    main()
