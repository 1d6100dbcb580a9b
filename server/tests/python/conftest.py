"""pytest fixtures for ferrite-server's integration tests.

Run from the repository root:
    FERRITE_SERVER_BIN=target/debug/ferrite-server .venv/bin/python -m pytest -q server/tests/python

* `model_repo` (session): the test model repository built by
  scripts/make_test_models.py into a temporary directory.
* `server` (session): ferrite-server serving that repository on free
  127.0.0.1 ports; on teardown it gets SIGTERM and must exit with code 0.
* `server_factory`: start extra servers with custom flags (same teardown check).
* Every server's stdout/stderr goes to a log file; a failing test gets the
  tail of the logs of the servers it used attached to its report.

If the server binary or the ONNX Runtime library is missing, tests fail with a
clear message when CI=true and are skipped with a loud reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

import ferrite_testlib as fl

# Main server flags. --max-message-bytes is small enough that test_errors can
# exceed it cheaply, large enough for every other test.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# Extra copy of add_sub that repository load/unload and health tests may unload
# (they always load it back), so other tests never see add_sub disappear.
RELOADABLE_MODEL = "add_sub_reload"


def pytest_configure(config):
    # Make ORT_DYLIB_PATH available to everything (the Makefile exports it too).
    default = fl.REPO_ROOT / ".cache" / "onnxruntime" / "libonnxruntime.so"
    if not os.environ.get("ORT_DYLIB_PATH") and default.exists():
        os.environ["ORT_DYLIB_PATH"] = str(default)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        start = getattr(item, "_ferrite_t0", 0.0)
        for s in fl.ALL_SERVERS:
            used = s.alive() or (s.stopped_at is not None and s.stopped_at >= start)
            if used:
                rep.sections.append((f"ferrite-server log: {s.name} ({s.log_path})", s.log_tail(6000)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._ferrite_t0 = time.monotonic()


# Per-test watchdog so a hung server cannot hang the run (tritonclient calls
# without client_timeout would wait forever). Override with TEST_TIMEOUT_S.
TEST_TIMEOUT_S = int(os.environ.get("TEST_TIMEOUT_S", "300"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    def on_alarm(signum, frame):
        raise TimeoutError(f"{item.nodeid} took longer than {TEST_TIMEOUT_S}s (TEST_TIMEOUT_S)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("model_repository")
    fl.make_test_models.build_repository(repo)
    shutil.copytree(repo / "add_sub", repo / RELOADABLE_MODEL)
    return repo


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server_logs")


@pytest.fixture(scope="session")
def server(model_repo, logs_dir):
    # Off by default, on here: the repository tests load and unload models,
    # the queue tests check priorities.
    s = fl.FerriteServer(
        [
            "--model-repository", str(model_repo),
            "--max-message-bytes", str(MAX_MESSAGE_BYTES),
            "--model-control-mode", "explicit",
            "--allow-priority",
        ],  # fmt: skip
        logs_dir,
        name="main",
    )
    s.start()
    yield s
    rc = s.terminate()
    assert rc == 0, f"main server exited with {rc} after SIGTERM\n{s.log_tail()}"


@pytest.fixture
def server_factory(logs_dir, request):
    """server_factory(args, name=..., start=True) -> FerriteServer; SIGTERMed at teardown, exit code must be 0."""
    started: list[fl.FerriteServer] = []

    def make(args, name=None, start=True, env=None):
        name = name or f"{request.node.name}-{len(started)}"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
        s = fl.FerriteServer(list(args), logs_dir, name=name, env=env)
        started.append(s)
        if start:
            s.start()
        return s

    yield make
    errors = []
    for s in started:
        if s.proc is None:
            continue
        if s.returncode is not None or s.proc.poll() is not None:
            continue  # the test stopped it itself and checked what it wanted
        rc = s.terminate()
        if rc != 0:
            errors.append(f"{s.name} exited with {rc} after SIGTERM\n{s.log_tail()}")
    assert not errors, "\n".join(errors)


@pytest.fixture
def grpc_client(server):
    c = server.grpc_client()
    yield c
    c.close()


@pytest.fixture
def http_client(server):
    c = server.http_client()
    yield c
    c.close()
