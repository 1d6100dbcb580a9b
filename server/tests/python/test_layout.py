"""The crates' module graphs (scripts/module_graph.py, drawn in
docs/architecture.md): no import cycle, no lower layer reaching up."""

import subprocess
import sys

import ferrite_testlib as fl


def test_module_graph_has_no_cycle_and_no_upward_dependency():
    done = subprocess.run([sys.executable, str(fl.REPO_ROOT / "scripts" / "module_graph.py")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "server/src:" in done.stdout and "operator/src:" in done.stdout
