"""Fixtures of `make test-hostile`: ferrite-server started as a pod runs it
(default flags), serving the tensor test models (and, for the LLM attacks, the
SmolLM2 LLM), attacked test by test while siege.py watches it.

The server is shared by the tests of a module; if an attack kills it, that
test fails and the next test gets a fresh server.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # ferrite_testlib, hostile_*

import ferrite_testlib as fl  # noqa: E402
import siege  # noqa: E402

LLM_MODEL = "smol"
LLM_DIR = fl.REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct-int4"


def pytest_configure(config):
    default = fl.REPO_ROOT / ".cache" / "onnxruntime" / "libonnxruntime.so"
    if not os.environ.get("ORT_DYLIB_PATH") and default.exists():
        os.environ["ORT_DYLIB_PATH"] = str(default)


def pytest_terminal_summary(terminalreporter):
    path = siege.write_report()
    if path:
        terminalreporter.write_sep("=", f"hostile report: {path}")
        terminalreporter.write(path.read_text())


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile_logs")


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    fl.make_test_models.build_repository(repo)
    return repo


def llm_dir() -> Path:
    if not (LLM_DIR / "llm.json").is_file():
        fl.missing(f"LLM model directory {LLM_DIR} not found; run `make models`")
    return LLM_DIR


class Target:
    """Starts the attacked server on demand, and again after an attack killed it."""

    def __init__(self, logs_dir: Path, args: list[str], name: str):
        self.logs_dir, self.args, self.name = logs_dir, args, name
        self.server: fl.FerriteServer | None = None

    def get(self) -> fl.FerriteServer:
        if self.server is None or not self.server.alive():
            self.server = fl.FerriteServer(self.args, self.logs_dir, name=f"{self.name}-{len(fl.ALL_SERVERS)}")
            self.server.start()
        return self.server

    def stop(self) -> None:
        if self.server is not None and self.server.alive():
            rc = self.server.terminate()
            assert rc == 0, f"{self.name} exited with {rc} after SIGTERM\n{self.server.log_tail()}"


@pytest.fixture(scope="module")
def target_factory(logs_dir, model_repo):
    """target_factory(extra_args, name) -> Target; stopped (must exit 0) after the module."""
    targets: list[Target] = []

    def make(extra_args=(), name="target", llm=False):
        args = ["--model-repository", str(model_repo)]
        if llm:
            args += ["--model", f"{LLM_MODEL}={llm_dir()}"]
        t = Target(logs_dir, args + list(extra_args), name)
        targets.append(t)
        return t

    yield make
    for t in targets:
        t.stop()


@pytest.fixture(scope="module")
def target(target_factory):
    """The server as the operator runs it: default flags, the tensor test models."""
    return target_factory(name="default")


@pytest.fixture(scope="module")
def llm_target(target_factory):
    """Default flags, the SmolLM2 LLM beside the tensor models (the good
    client calls add_sub, so a stall of the whole server shows)."""
    return target_factory(name="llm", llm=True)
