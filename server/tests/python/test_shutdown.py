"""SIGTERM: health goes NOT_SERVING, new requests are refused, in-flight
requests finish, exit code 0."""

from __future__ import annotations

import shutil
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from grpc_health.v1 import health_pb2, health_pb2_grpc

import ferrite_testlib as fl

tm = fl.make_test_models


@pytest.fixture
def drain_repo(model_repo, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for m in ("slow_q64", "add_sub"):
        shutil.copytree(model_repo / m, repo / m)
    return repo


def _x(i):
    return np.full((1, tm.SLOW_WIDTH), float(i), np.float32)


def _slow(client, i, **kw):
    inp = grpcclient.InferInput("INPUT0", [1, tm.SLOW_WIDTH], "FP32").set_data_from_numpy(_x(i))
    res = client.infer("slow_q64", [inp], **kw)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), _x(i))


def _slow_http(client, i):
    inp = httpclient.InferInput("INPUT0", [1, tm.SLOW_WIDTH], "FP32")
    inp.set_data_from_numpy(_x(i))
    res = client.infer("slow_q64", [inp])
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), _x(i))


def test_sigterm_idle_exits_zero(server_factory, drain_repo):
    s = server_factory(["--model-repository", str(drain_repo)])
    t = time.monotonic()
    rc = s.terminate(timeout=30)
    assert rc == 0, f"exit code {rc}\n{s.log_tail()}"
    assert time.monotonic() - t < 10, "idle server took more than 10 s to exit on SIGTERM"


def test_sigterm_drains_in_flight_requests(server_factory, drain_repo):
    n = 20
    s = server_factory(["--model-repository", str(drain_repo), "--shutdown-grace-seconds", "30"])
    warm = s.grpc_client()
    _slow(warm, -1)
    t = time.perf_counter()
    _slow(warm, -2)
    one_call = time.perf_counter() - t
    warm.close()

    # even i: gRPC, odd i: HTTP -- both transports must drain
    clients = [s.grpc_client() if i % 2 == 0 else s.http_client() for i in range(n)]
    done: dict[int, object] = {}
    lock = threading.Lock()

    def worker(i):
        try:
            if i % 2 == 0:
                _slow(clients[i], i, client_timeout=120)
            else:
                _slow_http(clients[i], i)
            r = None
        except Exception as e:
            r = e
        with lock:
            done[i] = r

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    # Wait until the requests are in the server (queued or running), at most 5 s.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        smp = fl.parse_metrics(urllib.request.urlopen(s.metrics_url, timeout=5).read().decode())
        pending = fl.metric_sum(smp, "ferrite_queue_depth", model="slow_q64") + fl.metric_sum(
            smp, "ferrite_inflight_requests", model="slow_q64"
        )
        if pending >= n - 4:
            break
        time.sleep(0.02)
    with lock:
        finished_before = len(done)
    assert finished_before <= 4, f"{finished_before} requests already finished; model too fast to test draining"

    health_ch = grpc.insecure_channel(s.grpc_url)
    health = health_pb2_grpc.HealthStub(health_ch)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == health_pb2.HealthCheckResponse.SERVING

    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    t_sig = time.monotonic()

    # Health is no longer SERVING (NOT_SERVING, or the RPC is refused outright).
    try:
        st = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        assert st != health_pb2.HealthCheckResponse.SERVING, "health still SERVING after SIGTERM"
    except grpc.RpcError:
        pass
    health_ch.close()
    # HTTP readiness is no longer 200.
    try:
        status, _ = s.http_get("/v2/health/ready", timeout=2)
        assert status != 200, "HTTP ready still 200 after SIGTERM"
    except OSError:
        pass
    # A new request on a new connection is not served.
    late = s.grpc_client()
    try:
        with pytest.raises(InferenceServerException):
            _slow(late, 999, client_timeout=5)
    finally:
        late.close()
    drained_while = time.monotonic() - t_sig

    for th in threads:
        th.join(timeout=120)
    for c in clients:
        c.close()
    errors = {i: e for i, e in done.items() if e is not None}
    assert len(done) == n
    assert not errors, f"in-flight requests failed during drain: {errors}"
    rc = s.terminate(timeout=60)  # already signalled; just waits
    assert rc == 0, f"exit code {rc} after draining\n{s.log_tail()}"
    assert drained_while < n * one_call + 5

    # The process is gone: new connections fail.
    c = s.grpc_client()
    with pytest.raises(Exception):
        c.is_server_live(client_timeout=2)
    c.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(s.http_base + "/v2/health/live", timeout=2)


def test_grace_period_bounds_shutdown(server_factory, drain_repo):
    """With --shutdown-grace-seconds 1 and several seconds of queued work, the
    process still exits promptly after SIGTERM."""
    n = 40
    s = server_factory(["--model-repository", str(drain_repo), "--shutdown-grace-seconds", "1"])
    clients = [s.grpc_client() for _ in range(n)]
    threads = []
    for i in range(n):
        th = threading.Thread(target=_try, args=(clients[i], i))
        threads.append(th)
        th.start()
    time.sleep(0.5)
    t = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    try:
        s.proc.wait(timeout=15)
    except Exception:
        s.kill()
        raise AssertionError(f"server still running 15 s after SIGTERM with --shutdown-grace-seconds 1\n{s.log_tail()}")
    took = time.monotonic() - t
    s.returncode = s.proc.returncode
    for th in threads:
        th.join(timeout=60)
    for c in clients:
        c.close()
    assert took < 8, f"exit took {took:.1f} s with a 1 s grace period"


def _try(client, i):
    try:
        _slow(client, i, client_timeout=60)
    except Exception:
        pass
