"""Shared helpers for ferrite-server's Python integration tests.

Starting servers, picking free ports, error assertions, metrics parsing.
Imported by conftest.py and the test modules (pytest puts this directory on
sys.path).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import make_demo_model  # noqa: E402,F401  (re-exported for the tests)
import make_test_models  # noqa: E402,F401  (re-exported for the tests)

READY_TIMEOUT_S = 60.0
SIGTERM_EXIT_TIMEOUT_S = 45.0  # > default --shutdown-grace-seconds (30)

# Every server started by the tests, so a failing test can show their logs.
ALL_SERVERS: list["FerriteServer"] = []


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(msg: str):
    """A prerequisite is missing: fail in CI, skip loudly elsewhere."""
    if in_ci():
        pytest.fail(f"MISSING PREREQUISITE (CI=true, so this fails): {msg}", pytrace=False)
    pytest.skip(f"MISSING PREREQUISITE (this is not a pass; set CI=true to make it fail): {msg}")


def server_binary() -> Path:
    env = os.environ.get("FERRITE_SERVER_BIN")
    if env:
        p = Path(env)
        if not p.is_absolute():
            p = (Path.cwd() / p) if (Path.cwd() / p).exists() else (REPO_ROOT / p)
        if not p.exists():
            pytest.fail(f"FERRITE_SERVER_BIN={env!r} does not exist (resolved to {p}); run `make build`", pytrace=False)
        return p
    p = REPO_ROOT / "target" / "debug" / "ferrite-server"
    if not p.exists():
        missing(f"server binary {p} not found and FERRITE_SERVER_BIN unset; run `make build`")
    return p


def ort_dylib() -> str:
    path = os.environ.get("ORT_DYLIB_PATH") or str(REPO_ROOT / ".cache" / "onnxruntime" / "libonnxruntime.so")
    if not Path(path).exists():
        missing(f"ONNX Runtime library {path} not found (ORT_DYLIB_PATH); run `make ort`")
    return path


def free_ports(n: int) -> list[int]:
    """n distinct currently-free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent():
    # Linux: SIGKILL the server if the pytest process dies, so no server is left behind.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ServerStartError(Exception):
    pass


class FerriteServer:
    """One ferrite-server process on free 127.0.0.1 ports."""

    def __init__(self, args: list[str], log_dir: Path, name: str = "server", env: dict | None = None):
        self.extra_args = list(args)
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.log_path = self.log_dir / f"{name}.log"
        self.started_at = 0.0
        self.stopped_at: float | None = None
        ALL_SERVERS.append(self)

    # ------------------------------------------------------------ lifecycle
    def start(self, wait: bool = True, attempts: int = 3) -> "FerriteServer":
        binary = server_binary()
        # The server reads FERRITE_* settings from the environment: start from a clean slate.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRITE_")}
        env["ORT_DYLIB_PATH"] = ort_dylib()
        env.setdefault("RUST_BACKTRACE", "1")
        env.update(self.env)
        for attempt in range(attempts):
            self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
            cmd = [
                str(binary),
                "serve",
                "--host", "127.0.0.1",
                "--http-port", str(self.http_port),
                "--grpc-port", str(self.grpc_port),
                "--metrics-port", str(self.metrics_port),
                *self.extra_args,
                # `make gpu-check` runs suites on the CUDA provider this way.
                *os.environ.get("FERRITE_TEST_SERVER_ARGS", "").split(),
            ]
            self.cmd = cmd
            log = open(self.log_path, "ab")
            log.write(f"\n=== attempt {attempt + 1}: {' '.join(cmd)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent, cwd=str(REPO_ROOT),
            )
            log.close()
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except ServerStartError:
                text = self.log_tail(4000)
                if self.proc.poll() is not None and re.search(r"(?i)address already in use|AddrInUse", text) and attempt + 1 < attempts:
                    continue  # lost a port race; retry with new ports
                self.kill()
                raise
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        gclient = None
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self.proc.returncode} before becoming ready.\n"
                    f"command: {' '.join(self.cmd)}\n--- log tail ---\n{self.log_tail()}"
                )
            try:
                status, _ = self.http_get("/v2/health/ready", timeout=2)
                if status == 200:
                    if gclient is None:
                        gclient = grpcclient.InferenceServerClient(self.grpc_url)
                    if gclient.is_server_ready(client_timeout=2):
                        gclient.close()
                        return
                    last = "gRPC is_server_ready() false"
                else:
                    last = f"HTTP /v2/health/ready -> {status}"
            except Exception as e:  # not up yet
                last = repr(e)
                if gclient is not None:
                    with contextlib.suppress(Exception):
                        gclient.close()
                    gclient = None
            time.sleep(0.2)
        raise ServerStartError(
            f"{self.name} not ready after {timeout:.0f}s (last: {last}).\ncommand: {' '.join(self.cmd)}\n"
            f"--- log tail ---\n{self.log_tail()}"
        )

    def terminate(self, timeout: float = SIGTERM_EXIT_TIMEOUT_S) -> int:
        """SIGTERM and wait; returns the exit code (kills and fails on timeout)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self.stopped_at = time.monotonic()
                raise AssertionError(
                    f"{self.name} did not exit within {timeout}s of SIGTERM (killed).\n--- log tail ---\n{self.log_tail()}"
                )
        self.stopped_at = time.monotonic()
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.stopped_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 6000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "<no log>"
        return data[-n:].decode("utf-8", "replace")

    # ----------------------------------------------------------------- urls
    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def grpc_client(self, **kw):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url, **kw)

    def http_client(self, **kw):
        import tritonclient.http as httpclient

        kw.setdefault("network_timeout", 120.0)
        kw.setdefault("connection_timeout", 120.0)
        return httpclient.InferenceServerClient(self.http_url, **kw)

    # ----------------------------------------------------------------- http
    def http_request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
        """Raw HTTP request; returns (status, headers, body bytes) also for 4xx/5xx."""
        req = urllib.request.Request(self.http_base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def http_get(self, path: str, timeout: float = 30):
        status, _, body = self.http_request("GET", path, timeout=timeout)
        return status, body

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as r:
            assert r.status == 200
            return r.read().decode()


# ---------------------------------------------------------------- metrics
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    """Prometheus text format -> [(name, labels, value)]."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.append((m.group(1), labels, float(m.group(4))))
    return out


def metric_sum(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == val for k, val in labels.items()))


def metric_find(samples, name: str, **labels):
    return [(lab, v) for n, lab, v in samples if n == name and all(lab.get(k) == val for k, val in labels.items())]


def request_counts(server, model: str) -> tuple[int, int, int]:
    """(queued, executing, finished) requests of `model`, as the server itself
    counts them (`ferrite_queue_depth`, `ferrite_inflight_requests` and
    `ferrite_requests_total` over every outcome). Tests that need requests to
    be queued wait on these instead of sleeping, so they hold on any machine."""
    samples = parse_metrics(server.metrics_text())
    return (
        int(metric_sum(samples, "ferrite_queue_depth", model=model)),
        int(metric_sum(samples, "ferrite_inflight_requests", model=model)),
        int(metric_sum(samples, "ferrite_requests_total", model=model)),
    )


def wait_until(predicate, timeout: float = 30.0, what: str = "the condition"):
    """Polls `predicate` until it returns a true value (returned), or fails
    the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(0.005)


# ------------------------------------------------------------------ errors
def grpc_status(exc) -> str:
    """'StatusCode.NOT_FOUND' -> 'NOT_FOUND' (tritonclient InferenceServerException or grpc.RpcError)."""
    import grpc

    if isinstance(exc, grpc.RpcError):
        return exc.code().name
    s = str(exc.status() or "")
    return s.split(".")[-1]


@contextlib.contextmanager
def expect_grpc_error(code: str, *must_contain: str):
    """Expect a tritonclient.grpc call to fail with `code`, message containing all of must_contain."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as ei:
        yield ei
    got = grpc_status(ei.value)
    msg = ei.value.message() or ""
    assert got == code, f"expected gRPC {code}, got {got}: {msg!r}"
    for s in must_contain:
        assert s in msg, f"gRPC {code} message should mention {s!r}, got: {msg!r}"


@contextlib.contextmanager
def expect_http_error(status: int, *must_contain: str):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as ei:
        yield ei
    got = str(ei.value.status())
    msg = ei.value.message() or ""
    assert got == str(status), f"expected HTTP {status}, got {got}: {msg!r} ({ei.value.debug_details()!r})"
    for s in must_contain:
        assert s in msg, f"HTTP {status} message should mention {s!r}, got: {msg!r}"


def assert_json_error(status_body, status: int, *must_contain: str):
    """For raw HTTP responses: status code and a JSON {"error": "..."} body."""
    import json

    got_status, body = status_body[0], status_body[-1]
    text = body.decode("utf-8", "replace")
    assert got_status == status, f"expected HTTP {status}, got {got_status}: {text!r}"
    try:
        obj = json.loads(text)
    except ValueError:
        raise AssertionError(f"HTTP {status} body is not JSON: {text!r}")
    assert isinstance(obj, dict) and isinstance(obj.get("error"), str) and obj["error"], f"no 'error' string in {text!r}"
    for s in must_contain:
        assert s in obj["error"], f"error should mention {s!r}: {obj['error']!r}"
    return obj["error"]


# -------------------------------------------------------------- inference
def grpc_infer_add_sub(client, a=None, b=None, **kw):
    import tritonclient.grpc as grpcclient

    if a is None:
        a = np.arange(16, dtype=np.float32).reshape(1, 16)
    if b is None:
        b = np.full((1, 16), 2.0, dtype=np.float32)
    i0 = grpcclient.InferInput("INPUT0", list(a.shape), "FP32").set_data_from_numpy(a)
    i1 = grpcclient.InferInput("INPUT1", list(b.shape), "FP32").set_data_from_numpy(b)
    return client.infer("add_sub", [i0, i1], **kw), a, b


def check_add_sub_ok(server) -> None:
    """A known-good request still answers correctly (used after every bad input)."""
    c = server.grpc_client()
    try:
        res, a, b = grpc_infer_add_sub(c)
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
    finally:
        c.close()
    h = server.http_client()
    try:
        import tritonclient.http as httpclient

        a = np.arange(16, dtype=np.float32).reshape(1, 16)
        i0 = httpclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(a)
        i1 = httpclient.InferInput("INPUT1", [1, 16], "FP32").set_data_from_numpy(a)
        r = h.infer("add_sub", [i0, i1])
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + a)
    finally:
        h.close()


def burst_until_refused(server, model: str, is_refusal, transport: str = "grpc", n: int = 12, bursts: int = 5):
    """Sends `n` requests at once to a one-instance `slow`-type model with a
    short queue, until one of them is refused; returns the outcomes of every
    burst sent (None for success, else the exception). A burst that a busy
    machine happened to spread out over more than the queue's worth of calls
    is sent again, so chance cannot decide the test."""
    import threading

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    width = make_test_models.SLOW_WIDTH
    x = np.zeros((1, width), np.float32)
    sent = []
    for attempt in range(bursts):
        clients = [server.grpc_client() if transport == "grpc" else server.http_client() for _ in range(n)]
        barrier = threading.Barrier(n)
        outcomes = [None] * n

        def call(i):
            module = grpcclient if transport == "grpc" else httpclient
            inp = module.InferInput("INPUT0", [1, width], "FP32")
            inp.set_data_from_numpy(x)
            barrier.wait(30)
            try:
                clients[i].infer(model, [inp])
            except Exception as e:  # judged by the caller
                outcomes[i] = e

        threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for c in clients:
            c.close()
        sent += outcomes
        if any(e is not None and is_refusal(e) for e in outcomes):
            break
        print(f"burst {attempt}: no request refused (the burst was spread out); sending another")
    return sent


# ------------------------------------------------------------ descriptions
def _normalized(value):
    """A description as both protocols can be compared: numbers that
    protobuf's JSON writes as strings (int64) read back as numbers, and
    default values (which protobuf's JSON leaves out) dropped."""
    if isinstance(value, dict):
        items = {k: _normalized(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v not in (None, False, 0, "", [], {})}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def _differences(path: str, grpc, http) -> list[str]:
    if isinstance(grpc, dict) and isinstance(http, dict):
        found = []
        for key in sorted(set(grpc) | set(http)):
            found += _differences(f"{path}.{key}", grpc.get(key), http.get(key))
        return found
    if isinstance(grpc, list) and isinstance(http, list) and len(grpc) == len(http):
        return [d for i, (g, h) in enumerate(zip(grpc, http)) for d in _differences(f"{path}[{i}]", g, h)]
    return [] if grpc == http else [f"{path}: gRPC {grpc!r}, REST {http!r}"]


def description_differences(server) -> tuple[list[str], list[str]]:
    """Every ready model of `server`, described over gRPC and over REST
    (metadata, configuration, statistics), compared field by field: the
    models compared and the differences found."""
    grpc, http = server.grpc_client(), server.http_client()
    try:
        models = [m["name"] for m in http.get_model_repository_index() if m.get("state") == "READY"]
        found = []
        for name in models:
            pairs = {
                "metadata": (grpc.get_model_metadata(name, as_json=True), http.get_model_metadata(name)),
                "config": (grpc.get_model_config(name, as_json=True)["config"], http.get_model_config(name)),
                "statistics": (grpc.get_inference_statistics(name, as_json=True),
                               http.get_inference_statistics(name)),
            }
            for what, (by_grpc, by_http) in pairs.items():
                found += _differences(f"{name} {what}", _normalized(by_grpc), _normalized(by_http))
        return models, found
    finally:
        grpc.close()
        http.close()
