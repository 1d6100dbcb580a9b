"""Queue policy on the `slow` models (one instance, no batching, tens of ms a call):
full queue -> RESOURCE_EXHAUSTED / 429, deadline expired in queue ->
DEADLINE_EXCEEDED / 504, priority 1 overtakes queued normal requests."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import ferrite_testlib as fl

tm = fl.make_test_models


def _x(i: float) -> np.ndarray:
    return np.full((1, tm.SLOW_WIDTH), float(i), np.float32)


def _grpc_slow(client, model, i, **kw):
    inp = grpcclient.InferInput("INPUT0", [1, tm.SLOW_WIDTH], "FP32").set_data_from_numpy(_x(i))
    res = client.infer(model, [inp], **kw)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), _x(i))
    return res


def _http_slow(client, model, i, **kw):
    inp = httpclient.InferInput("INPUT0", [1, tm.SLOW_WIDTH], "FP32")
    inp.set_data_from_numpy(_x(i))
    res = client.infer(model, [inp], **kw)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), _x(i))
    return res


@pytest.fixture(scope="module")
def slow_call_s(server):
    """Seconds one `slow` call takes on this machine (warm)."""
    c = server.grpc_client()
    try:
        _grpc_slow(c, "slow_q64", 0)
        t = time.perf_counter()
        for i in range(3):
            _grpc_slow(c, "slow_q64", i)
        dt = (time.perf_counter() - t) / 3
    finally:
        c.close()
    assert dt >= 0.015, f"`slow` takes only {dt * 1000:.1f} ms per call; queue tests need tens of ms"
    return dt


class Background:
    """Run calls in threads; remember result/exception and completion time."""

    def __init__(self):
        self.threads = []
        self.out = {}
        self.lock = threading.Lock()

    def start(self, key, fn):
        def run():
            try:
                r = fn()
                err = None
            except Exception as e:  # recorded, asserted by the test
                r, err = None, e
            with self.lock:
                self.out[key] = (time.monotonic(), r, err)

        t = threading.Thread(target=run)
        t.start()
        self.threads.append(t)
        return t

    def join(self, timeout=120):
        for t in self.threads:
            t.join(timeout)
        assert all(not t.is_alive() for t in self.threads), "background requests did not finish"


def _statuses(bg, http=False):
    ok, full, other = 0, 0, []
    for key, (_, r, err) in bg.out.items():
        if err is None:
            ok += 1
        elif isinstance(err, InferenceServerException) and (
            (not http and fl.grpc_status(err) == "RESOURCE_EXHAUSTED") or (http and str(err.status()) == "429")
        ):
            full += 1
            assert err.message(), "RESOURCE_EXHAUSTED without a message"
        else:
            other.append(f"{key}: {err!r}")
    return ok, full, other


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_queue_full(server, slow_call_s, transport):
    n = 12
    clients = [server.grpc_client() if transport == "grpc" else server.http_client() for _ in range(n)]
    barrier = threading.Barrier(n)
    bg = Background()

    def call(i):
        barrier.wait(30)
        if transport == "grpc":
            return _grpc_slow(clients[i], "slow", i)
        return _http_slow(clients[i], "slow", i)

    for i in range(n):
        bg.start(i, lambda i=i: call(i))
    bg.join()
    for c in clients:
        c.close()
    ok, full, other = _statuses(bg, http=transport == "http")
    assert not other, f"unexpected errors: {other}"
    assert full >= 1, f"no request was refused with a full queue (max_queue_size 2): {ok} succeeded"
    assert ok >= 2, f"only {ok} requests succeeded; the running one and the queued ones must"
    # and afterwards the model works again
    c = server.grpc_client()
    _grpc_slow(c, "slow", 99)
    c.close()


def _occupy(server, bg, model, count, start_key=0):
    """Start `count` requests that keep `model`'s single instance busy."""
    clients = []
    for k in range(count):
        c = server.grpc_client()
        clients.append(c)
        bg.start(f"busy{start_key + k}", lambda c=c, k=k: _grpc_slow(c, model, 1000 + k))
        time.sleep(0.01)
    return clients


def test_deadline_in_queue_grpc_timeout_parameter(server, slow_call_s):
    bg = Background()
    clients = _occupy(server, bg, "slow_q64", 2)
    time.sleep(0.02)
    c = server.grpc_client()
    try:
        with fl.expect_grpc_error("DEADLINE_EXCEEDED"):
            _grpc_slow(c, "slow_q64", 5, timeout=1000)  # 1 ms, in microseconds
        # a generous timeout is fine
        _grpc_slow(c, "slow_q64", 6, timeout=30_000_000)
    finally:
        bg.join()
        for x in clients + [c]:
            x.close()
    assert all(err is None for _, _, err in bg.out.values()), bg.out


def test_deadline_in_queue_http_timeout_parameter(server, slow_call_s):
    bg = Background()
    clients = _occupy(server, bg, "slow_q64", 2)
    time.sleep(0.02)
    c = server.http_client()
    try:
        with fl.expect_http_error(504):
            _http_slow(c, "slow_q64", 5, timeout=1000)
        _http_slow(c, "slow_q64", 6, timeout=30_000_000)
    finally:
        bg.join()
        for x in clients + [c]:
            x.close()
    assert all(err is None for _, _, err in bg.out.values()), bg.out


def test_grpc_deadline_drops_queued_requests(server, slow_call_s):
    """Requests whose gRPC deadline (client_timeout) expired while queued must not
    be executed: a request queued behind 8 of them finishes far sooner than 9 calls."""
    n_expired = 8
    bg = Background()
    clients = _occupy(server, bg, "slow_q64", 1)
    expired = []
    for k in range(n_expired):
        c = server.grpc_client()
        expired.append(c)
        bg.start(f"exp{k}", lambda c=c, k=k: _grpc_slow(c, "slow_q64", 2000 + k, client_timeout=0.03))
        time.sleep(0.003)
    time.sleep(0.06)  # every expired request's deadline has passed
    c = server.grpc_client()
    t0 = time.monotonic()
    try:
        _grpc_slow(c, "slow_q64", 7)
        latency = time.monotonic() - t0
    finally:
        bg.join()
        for x in clients + expired + [c]:
            x.close()
    for k in range(n_expired):
        _, _, err = bg.out[f"exp{k}"]
        assert err is not None and fl.grpc_status(err) == "DEADLINE_EXCEEDED", (k, err)
    budget = 4 * slow_call_s + 0.15
    assert latency < budget, (
        f"request behind {n_expired} deadline-expired requests took {latency * 1000:.0f} ms "
        f"(one call is {slow_call_s * 1000:.0f} ms, budget {budget * 1000:.0f} ms): expired requests were executed"
    )


def _stub_slow_int64_priority(server, i):
    """Hand-built ModelInfer with priority as an int64 parameter (tritonclient sends uint64)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name="slow_q64")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, tm.SLOW_WIDTH])
    req.raw_input_contents.append(_x(i).tobytes())
    req.parameters["priority"].int64_param = 1
    with grpc.insecure_channel(server.grpc_url) as ch:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, tm.SLOW_WIDTH)
    np.testing.assert_array_equal(got, _x(i))
    return resp


@pytest.mark.parametrize("param_type", ["uint64", "int64", "http"])
def test_priority_overtakes_queued_requests(server, slow_call_s, param_type):
    n_normal = 5
    bg = Background()
    clients = _occupy(server, bg, "slow_q64", 1)  # running
    time.sleep(0.03)
    for k in range(n_normal):
        c = server.grpc_client()
        clients.append(c)
        bg.start(f"normal{k}", lambda c=c, k=k: _grpc_slow(c, "slow_q64", 3000 + k))
        time.sleep(0.015)
    c = server.grpc_client()
    clients.append(c)
    if param_type == "uint64":  # tritonclient's encoding
        bg.start("high", lambda: _grpc_slow(c, "slow_q64", 4000, priority=1))
    elif param_type == "http":
        hc = server.http_client()
        clients.append(hc)
        bg.start("high", lambda: _http_slow(hc, "slow_q64", 4000, priority=1))
    else:
        bg.start("high", lambda: _stub_slow_int64_priority(server, 4000))
    bg.join()
    for x in clients:
        x.close()
    errs = {k: e for k, (_, _, e) in bg.out.items() if e is not None}
    assert not errs, errs
    order = sorted((t, k) for k, (t, _, _) in bg.out.items() if not k.startswith("busy"))
    keys = [k for _, k in order]
    # The high-priority request was sent last but must finish before the normal
    # ones queued ahead of it (allowing one normal request that the scheduler
    # may already have taken while the first call ran).
    assert keys.index("high") <= 1, f"completion order {keys}: priority 1 did not overtake the queue"
    # Among the normal ones, FIFO order holds.
    normals = [k for k in keys if k.startswith("normal")]
    assert normals == sorted(normals, key=lambda s: int(s[6:])), f"normal requests out of order: {normals}"


def test_cancelled_requests_leave_the_queue(server, slow_call_s):
    """Clients that go away take their requests out of the queue: they are
    counted as cancelled and never run, so a request behind them does not
    wait for them."""
    n_cancelled = 8
    bg = Background()
    # Four ahead of them (one running, three queued): the cancelled requests
    # cannot reach the model before they are cancelled, even on a slow machine.
    clients = _occupy(server, bg, "slow_q64", 4)
    before = fl.metric_sum(fl.parse_metrics(server.metrics_text()), "ferrite_requests_total",
                           model="slow_q64", outcome="cancelled")
    canceller = server.grpc_client()
    calls = []
    for k in range(n_cancelled):
        inp = grpcclient.InferInput("INPUT0", [1, tm.SLOW_WIDTH], "FP32").set_data_from_numpy(_x(3000 + k))
        calls.append(canceller.async_infer("slow_q64", [inp], callback=lambda result, error: None))
    time.sleep(0.05)
    for call in calls:
        call.cancel()
    c = server.grpc_client()
    try:
        deadline = time.monotonic() + 5
        while True:
            samples = fl.parse_metrics(server.metrics_text())
            cancelled = fl.metric_sum(samples, "ferrite_requests_total", model="slow_q64", outcome="cancelled")
            if cancelled - before >= n_cancelled or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert cancelled - before >= n_cancelled, f"only {cancelled - before} of {n_cancelled} counted as cancelled"
        t0 = time.monotonic()
        _grpc_slow(c, "slow_q64", 8)
        latency = time.monotonic() - t0
        budget = 6 * slow_call_s + 0.15
        assert latency < budget, f"a request behind cancelled ones took {latency * 1000:.0f} ms (budget {budget * 1000:.0f})"
    finally:
        bg.join()
        for x in clients + [canceller, c]:
            x.close()
