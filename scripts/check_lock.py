#!/usr/bin/env python3
"""Check that requirements-lock.txt pins every package of requirements-dev.txt at the
same version, each with at least one --hash: `make venv` installs the lock alone
(--require-hashes), so a pin added to requirements-dev.txt without `make lock` would
otherwise be missing from the virtualenv without a word.

Usage: check_lock.py requirements-dev.txt requirements-lock.txt
"""

import re
import sys

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path, want_hashes):
    """name -> version of each `name==version` requirement; with want_hashes, also
    the names that have no --hash."""
    text = open(path).read().replace("\\\n", " ")
    found, unhashed = {}, []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        m = PIN.match(line)
        if not m:
            continue
        name = normalize(m.group(1))
        found[name] = m.group(3)
        if want_hashes and "--hash=sha256:" not in line:
            unhashed.append(name)
    return found, unhashed


def main(dev_path, lock_path):
    dev, _ = pins(dev_path, False)
    lock, unhashed = pins(lock_path, True)
    problems = [f"{n}=={v} is not in {lock_path}" for n, v in dev.items() if n not in lock]
    problems += [f"{n}: {dev_path} pins {v}, {lock_path} {lock[n]}" for n, v in dev.items() if n in lock and lock[n] != v]
    problems += [f"{n} has no --hash in {lock_path}" for n in unhashed]
    if problems:
        sys.exit("check_lock: " + "; ".join(problems) + ": run `make lock`")
    print(f"==> {lock_path}: {len(lock)} packages, all hashed, covering {dev_path}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
