"""Queue policy on the `slow` models (one instance, no batching, tens of ms a call):
full queue -> RESOURCE_EXHAUSTED / 429, deadline expired in queue ->
DEADLINE_EXCEEDED / 504, priority 1 overtakes queued normal requests (only
with --allow-priority).

No test here sleeps and hopes: they wait on the server's own counts (queue
depth, requests executing and finished, ModelStatistics) so that they hold
on a fast machine and on a busy one alike."""

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
    """Seconds one `slow` call takes on this machine (warm). A precondition
    of the tests here (a call must outlast a few round trips of the test's
    own polling); how much work they queue is read from the server, not
    derived from this figure."""
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


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_queue_full(server, slow_call_s, transport):
    """Requests at once on `slow` (one instance, a queue of 2): some are
    refused with RESOURCE_EXHAUSTED / 429 and a message, the others served."""
    http = transport == "http"

    def refused(e):
        if not isinstance(e, InferenceServerException):
            return False
        return str(e.status()) == "429" if http else fl.grpc_status(e) == "RESOURCE_EXHAUSTED"

    outcomes = fl.burst_until_refused(server, "slow", refused, transport)
    other = [repr(e) for e in outcomes if e is not None and not refused(e)]
    assert not other, f"unexpected errors: {other}"
    full = [e for e in outcomes if e is not None]
    assert full, f"no request was refused with a full queue (max_queue_size 2) in 5 bursts"
    assert all(e.message() for e in full), "a refusal without a message"
    ok = outcomes.count(None)
    assert ok >= 2, f"only {ok} requests succeeded; the running one and the queued ones must"
    # and afterwards the model works again
    c = server.grpc_client()
    _grpc_slow(c, "slow", 99)
    c.close()


MODEL = "slow_q64"
# Busy requests queued ahead of a scenario, tried in turn until the
# scenario's requests were all queued before the busy work ran out.
BUSY_QUEUE_LADDER = (8, 24, 48)


class Held:
    """Requests of `slow_q64` started by a test, and the server's own count
    of them: each start waits until the server holds the request (queued,
    executing or finished), so a test knows what is queued instead of
    guessing it from sleeps."""

    def __init__(self, server):
        self.server = server
        self.bg = Background()
        self.clients = []
        self.sent = 0
        self.finished_before = fl.request_counts(server, MODEL)[2]

    def counts(self) -> tuple[int, int, int]:
        """(queued, executing, finished) since this object was made."""
        queued, executing, finished = fl.request_counts(self.server, MODEL)
        return queued, executing, finished - self.finished_before

    def start(self, key, fn):
        """Starts a request and waits until the server holds it."""
        self.bg.start(key, fn)
        self.sent += 1
        self.wait_held()

    def wait_held(self):
        fl.wait_until(lambda: sum(self.counts()) >= self.sent, what="the server to hold the requests sent")

    def occupy(self, queued: int) -> int:
        """Keeps the model's single instance busy with `queued` requests
        waiting behind a running one; returns how many were sent."""
        assert queued <= 48, f"{queued} requests would leave too little of slow_q64's queue of 64"
        client = self.client()
        for k in range(queued + 1):
            self.bg.start(f"busy{k}", lambda k=k: _grpc_slow(client, MODEL, 1000 + k))
        self.sent += queued + 1
        self.wait_held()
        return queued + 1

    def client(self, http=False):
        c = self.server.http_client() if http else self.server.grpc_client()
        self.clients.append(c)
        return c

    def join(self):
        self.bg.join()
        for c in self.clients:
            c.close()

    def errors(self, prefix=""):
        return {k: e for k, (_, _, e) in self.bg.out.items() if e is not None and str(k).startswith(prefix)}


def _inference_count(server) -> int:
    c = server.grpc_client()
    try:
        return c.get_inference_statistics(MODEL).model_stats[0].inference_count
    finally:
        c.close()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_deadline_in_queue_timeout_parameter(server, slow_call_s, transport):
    """The `timeout` parameter (microseconds) expires a request that waits
    in the queue behind half a second of work."""
    held = Held(server)
    held.occupy(16)
    c = held.client(http=transport == "http")
    call = _grpc_slow if transport == "grpc" else _http_slow
    expected = fl.expect_grpc_error("DEADLINE_EXCEEDED") if transport == "grpc" else fl.expect_http_error(504)
    try:
        with expected:
            call(c, MODEL, 5, timeout=1000)  # 1 ms
        call(c, MODEL, 6, timeout=30_000_000)  # a generous timeout is fine
    finally:
        held.join()
    assert not held.errors(), held.errors()


def test_grpc_deadline_drops_queued_requests(server, slow_call_s):
    """Requests whose gRPC deadline (client_timeout) expired while queued
    are never executed: the model's inference count grows by the other
    requests only. That busy work was still queued when every deadline had
    passed is read from the server's queue depth; if it ran out first (a very
    fast or very loaded machine), the scenario is repeated with more of it."""
    n_expired = 8
    for queued in BUSY_QUEUE_LADDER:
        executed_before = _inference_count(server)
        held = Held(server)
        busy = held.occupy(queued)
        client = held.client()
        for k in range(n_expired):
            held.bg.start(f"exp{k}", lambda k=k: _grpc_slow(client, MODEL, 2000 + k, client_timeout=0.03))
        fl.wait_until(lambda: len(held.errors("exp")) == n_expired, what="the expired requests to fail")
        busy_still_queued = held.counts()[0]
        try:
            _grpc_slow(held.client(), MODEL, 7)
        finally:
            held.join()
        if busy_still_queued >= 1:
            break
        print(f"the busy work ({queued} queued requests) ran out before every deadline passed; repeating with more")
    else:
        pytest.fail(f"the busy work never outlasted the expiring requests' deadlines, even {queued} queued requests")
    for k in range(n_expired):
        _, _, err = held.bg.out[f"exp{k}"]
        assert err is not None and fl.grpc_status(err) == "DEADLINE_EXCEEDED", (k, err)
    assert not held.errors("busy"), held.errors("busy")
    executed = _inference_count(server) - executed_before
    assert executed == busy + 1, f"{executed} requests executed, expected {busy} + 1: expired requests ran"


def _stub_slow_int64_priority(server, i):
    """Hand-built ModelInfer with priority as an int64 parameter (tritonclient sends uint64)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    req = service_pb2.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, tm.SLOW_WIDTH])
    req.raw_input_contents.append(_x(i).tobytes())
    req.parameters["priority"].int64_param = 1
    with grpc.insecure_channel(server.grpc_url) as ch:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, tm.SLOW_WIDTH)
    np.testing.assert_array_equal(got, _x(i))
    return resp


def _priority_scenario(server, param_type) -> list[str]:
    """Normal requests queue up behind busy work, one by one, then a
    priority-1 request is sent last; returns the completion order of those
    six. The server's queue depth, read once the high-priority request is
    in, proves the normal ones were all still waiting; if the busy work ran
    out first (a very fast or very loaded machine), the scenario is repeated
    with more of it."""
    n_normal = 5
    for queued in BUSY_QUEUE_LADDER:
        held = Held(server)
        held.occupy(queued)
        for k in range(n_normal):
            c = held.client()
            held.start(f"normal{k}", lambda c=c, k=k: _grpc_slow(c, MODEL, 3000 + k))
        if param_type == "uint64":  # tritonclient's encoding
            c = held.client()
            held.start("high", lambda: _grpc_slow(c, MODEL, 4000, priority=1))
        elif param_type == "http":
            hc = held.client(http=True)
            held.start("high", lambda: _http_slow(hc, MODEL, 4000, priority=1))
        else:
            held.start("high", lambda: _stub_slow_int64_priority(server, 4000))
        queued_with_high = held.counts()[0]
        held.join()
        assert not held.errors(), held.errors()
        if queued_with_high >= n_normal + 1:
            break
        print(f"only {queued_with_high} requests were queued with the high-priority one behind {queued} busy "
              "ones; repeating with more")
    else:
        pytest.fail(f"the busy work never outlasted queuing 6 requests, even {queued} queued requests")
    order = sorted((t, k) for k, (t, _, _) in held.bg.out.items() if not k.startswith("busy"))
    return [k for _, k in order]


@pytest.mark.parametrize("param_type", ["uint64", "int64", "http"])
def test_priority_overtakes_queued_requests(server, slow_call_s, param_type):
    """With --allow-priority (the main test server has it), a priority-1
    request sent last finishes before the queued normal ones, which keep
    their order."""
    keys = _priority_scenario(server, param_type)
    assert keys[0] == "high", f"completion order {keys}: priority 1 did not overtake the queue"
    assert keys[1:] == [f"normal{k}" for k in range(5)], f"normal requests out of order: {keys}"


@pytest.mark.parametrize("param_type", ["uint64", "http"])
def test_priority_is_ignored_without_allow_priority(server_factory, model_repo, slow_call_s, param_type):
    """Without --allow-priority any client could jump the queue: priority 1
    is served at the default priority (as Triton serves a priority outside
    the model's levels), so the request sent last finishes last."""
    plain = server_factory(["--model-repository", str(model_repo)])
    keys = _priority_scenario(plain, param_type)
    assert keys == [f"normal{k}" for k in range(5)] + ["high"], f"completion order {keys}: priority was honoured"


def test_cancelled_requests_leave_the_queue(server, slow_call_s):
    """Clients that go away take their requests out of the queue: they are
    counted as cancelled and never run. As in the deadline test, busy work
    still queued once the cancellations are counted proves that none of them
    could have reached the model first."""
    n_cancelled = 8

    def cancelled():
        samples = fl.parse_metrics(server.metrics_text())
        return fl.metric_sum(samples, "ferrite_requests_total", model=MODEL, outcome="cancelled")

    for queued in BUSY_QUEUE_LADDER:
        executed_before, cancelled_before = _inference_count(server), cancelled()
        held = Held(server)
        busy = held.occupy(queued)
        canceller = held.client()
        calls = []
        for k in range(n_cancelled):
            inp = grpcclient.InferInput("INPUT0", [1, tm.SLOW_WIDTH], "FP32").set_data_from_numpy(_x(3000 + k))
            calls.append(canceller.async_infer(MODEL, [inp], callback=lambda result, error: None))
        held.sent += n_cancelled
        held.wait_held()
        for call in calls:
            call.cancel()
        # Until all are counted as cancelled, or the queue ran dry (then
        # some were executed before they were cancelled: not a fair trial).
        fl.wait_until(lambda: cancelled() - cancelled_before >= n_cancelled or held.counts()[0] == 0,
                      timeout=60, what="the cancellations to be counted")
        busy_still_queued = held.counts()[0]
        try:
            _grpc_slow(held.client(), MODEL, 8)
        finally:
            held.join()
        assert not held.errors(), held.errors()
        if busy_still_queued >= 1:
            break
        print(f"the busy work ({queued} queued requests) ran out before the cancellations; repeating with more")
    else:
        pytest.fail(f"the busy work never outlasted the cancellations, even {queued} queued requests")
    assert cancelled() - cancelled_before >= n_cancelled
    executed = _inference_count(server) - executed_before
    assert executed == busy + 1, f"{executed} requests executed, expected {busy} + 1: cancelled requests ran"
