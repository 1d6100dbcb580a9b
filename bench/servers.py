"""Server processes for the benchmarks (bench/bench.py, ab.py, profile.py):
start one, wait until it is ready, read its memory, stop it; and the
protocol floor (`ferrite-floor`, bench/floor), started like ferrite-server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ROOT / "target" / "release" / "ferrite-floor"
# ONNX type strings (bench.signature) as Open Inference Protocol datatypes.
DATATYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(bool)": "BOOL", "tensor(int64)": "INT64",
             "tensor(int32)": "INT32", "tensor(uint8)": "UINT8", "tensor(int8)": "INT8", "tensor(float16)": "FP16"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process in its own process group, its output in `log_path`."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path):
        self.name = name
        self.log_path = log_path
        self.log_file = open(log_path, "w")
        self.process = subprocess.Popen(argv, env=env, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, http_port: int, models: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        urls = [f"http://127.0.0.1:{http_port}/v2/health/ready"] + [
            f"http://127.0.0.1:{http_port}/v2/models/{m}/ready" for m in models]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.process.returncode}); its log:\n"
                                 + self.log_path.read_text()[-4000:])
            try:
                for url in urls:
                    urllib.request.urlopen(url, timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise SystemExit(f"{self.name} not ready after {timeout:.0f} s; its log:\n" + self.log_path.read_text()[-4000:])

    def rss_bytes(self) -> int:
        """Resident memory of the server and its child processes (Triton's
        Python backend stubs)."""
        total, todo = 0, [self.process.pid]
        while todo:
            pid = todo.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                todo += [int(c) for c in children]
            except (OSError, StopIteration):
                pass
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log_file.close()


def start_floor(model: str, signature: tuple[list, list], log_path: Path) -> tuple[Server, dict[str, int]]:
    """`ferrite-floor` answering as `model` with the (inputs, outputs) of
    its ONNX signature (bench.signature): a fixed response of the same
    names, datatypes, shapes and sizes as ferrite-server's, on gRPC and HTTP.
    Returns the server, ready, and its ports."""
    if not FLOOR.exists():
        raise SystemExit(f"{FLOOR} is missing: run `make release` first")

    def spec(tensor) -> str:
        name, onnx_type, shape = tensor
        return f"{name}:{DATATYPES[onnx_type]}:{','.join(map(str, shape))}"

    inputs, outputs = signature
    grpc, http = free_port(), free_port()
    argv = [str(FLOOR), "--host", "127.0.0.1", "--grpc-port", str(grpc), "--http-port", str(http), "--model", model]
    argv += [f"--input={spec(t)}" for t in inputs] + [f"--output={spec(t)}" for t in outputs]
    server = Server("ferrite-floor", argv, dict(os.environ), log_path)
    server.wait_ready(http, [model], timeout=30)
    return server, {"grpc": grpc, "http": http}
