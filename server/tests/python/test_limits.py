"""Bounded decoding and connection limits (issue 12, item 3), against real
server processes: each attack of hostile.py runs while a well-behaved
tritonclient keeps calling, and the server's peak RSS is read from /proc.

Figures before the fix (same attacks): 2M empty `inputs` grew the server by
597 MiB and stalled other calls for 1.5 s; an 11.4 MiB JSON tensor grew it by
274 MiB; 300 half-header connections were still open 22 s later.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import ferrite_testlib as fl
import hostile

HOST = "127.0.0.1"


class GoodClient(threading.Thread):
    """Calls add_sub over gRPC in a loop, recording latencies and failures."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server = server
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self):
        client = self.server.grpc_client()
        try:
            while not self.halt.is_set():
                start = time.monotonic()
                try:
                    fl.grpc_infer_add_sub(client, client_timeout=10)
                    self.latencies.append(time.monotonic() - start)
                except Exception as error:  # noqa: BLE001 - any failure counts
                    self.errors.append(str(error)[:200])
                time.sleep(0.005)
        finally:
            client.close()

    def __enter__(self):
        self.start()
        fl.wait_until(lambda: len(self.latencies) >= 5, timeout=30, what="the good client to get going")
        self.latencies.clear()
        return self

    def __exit__(self, *exc):
        self.halt.set()
        self.join(timeout=15)

    def check(self, p99_bound_s: float = 0.5):
        assert not self.errors, self.errors[:3]
        assert self.latencies, "the good client completed no call during the attack"
        p99 = float(np.percentile(self.latencies, 99))
        assert p99 < p99_bound_s, f"good client p99 {p99 * 1000:.0f} ms during the attack"
        return p99


def measured(server, attack):
    """Runs attack() beside a good client; returns (answer, RSS growth MiB, good p99 s)."""
    pid = server.proc.pid
    with GoodClient(server) as good:
        hostile.reset_peak_rss(pid)
        baseline = hostile.vm_kib(pid, "VmRSS")
        answer = attack()
        time.sleep(0.3)
        growth = (hostile.vm_kib(pid, "VmHWM") - baseline) / 1024
    p99 = good.check()
    print(f"\n{attack.__name__ if hasattr(attack, '__name__') else attack}: {answer}; "
          f"peak RSS growth {growth:.0f} MiB; good client p99 {p99 * 1000:.0f} ms")
    return answer, growth, p99


def start(server_factory, model_repo, *flags):
    return server_factory(["--model-repository", str(model_repo), *flags])


def test_empty_inputs_are_refused_before_decoding(server_factory, model_repo):
    server = start(server_factory, model_repo, "--max-message-bytes", str(8 << 20))
    answer, growth, _ = measured(server, lambda: hostile.grpc_empty_inputs(HOST, server.grpc_port))
    assert answer.status == "INVALID_ARGUMENT", answer
    assert "2000000 `inputs` entries" in answer.message and "degenerate" in answer.message, answer
    assert answer.seconds < 3, answer
    assert growth < 64, f"the server grew by {growth:.0f} MiB (597 before the pre-scan)"


def test_a_big_json_tensor_decodes_typed(server_factory, model_repo):
    server = start(server_factory, model_repo, "--max-message-bytes", str(16 << 20))
    answer, growth, _ = measured(server, lambda: hostile.http_big_json_tensor(HOST, server.http_port))
    # Decoded, then refused by the model's shape ([1, 16]).
    assert answer.status == "400" and "INPUT0" in answer.message, answer
    assert growth < 100, f"the server grew by {growth:.0f} MiB (274 through serde_json::Value)"


def test_half_headers_are_closed_after_the_timeout(server_factory, model_repo):
    server = start(server_factory, model_repo, "--header-read-timeout-seconds", "2")
    with GoodClient(server) as good:
        http = hostile.open_sockets(HOST, server.http_port, 300, hostile.HALF_HTTP1_HEADER)
        grpc = hostile.open_sockets(HOST, server.grpc_port, 300, hostile.HALF_HTTP2_PREFACE)
        idle = hostile.open_sockets(HOST, server.http_port, 50)
        http2 = hostile.open_sockets(HOST, server.http_port, 50, hostile.HALF_HTTP2_PREFACE)
        try:
            assert hostile.still_open(http) == 300
            time.sleep(4)
            assert hostile.still_open(http) == 0
            assert hostile.still_open(grpc) == 0
            assert hostile.still_open(idle) == 0
            assert hostile.still_open(http2) == 0
        finally:
            for sockets in (http, grpc, idle, http2):
                hostile.close_all(sockets)
    good.check()


def test_header_blocks_are_bounded(server):
    # Over 64 KiB, under hyper's default (~400 KiB).
    answer = hostile.huge_header(HOST, server.http_port, kib=128)
    assert answer.status in ("431", "closed"), answer
    assert server.http_get("/v2/health/live")[0] == 200


def connections(server, port: str) -> float:
    return fl.metric_sum(fl.parse_metrics(server.metrics_text()), "ferrite_connections", port=port)


def test_connections_beyond_the_limit_are_closed(server_factory, model_repo):
    server = start(server_factory, model_repo, "--max-connections", "8", "--header-read-timeout-seconds", "60")
    with GoodClient(server) as good:  # on the gRPC port: one connection
        sockets, closed = hostile.connection_flood(HOST, server.http_port, 12)
        try:
            assert closed == 4
            assert connections(server, "http") == 8
            refused = fl.metric_sum(fl.parse_metrics(server.metrics_text()), "ferrite_connections_refused_total", port="http")
            assert refused >= 4
        finally:
            hostile.close_all(sockets)
        fl.wait_until(lambda: connections(server, "http") == 0, timeout=10, what="the connections to close")
        assert server.http_get("/v2/health/ready")[0] == 200
        grpc_sockets, closed = hostile.connection_flood(HOST, server.grpc_port, 10)
        hostile.close_all(grpc_sockets)
        assert closed == 3  # the good client holds one of the 8
    good.check()


@pytest.mark.parametrize("port", ["grpc", "http"])
def test_streams_beyond_the_limit_are_refused(server_factory, model_repo, port):
    server = start(server_factory, model_repo, "--max-concurrent-streams", "4")
    if port == "grpc":
        flood = hostile.stream_flood(HOST, server.grpc_port, 10)
    else:
        flood = hostile.stream_flood(HOST, server.http_port, 10, path="/v2/models/add_sub/infer")
    assert flood.advertised_max_streams == 4, flood
    assert flood.refused == 6, flood
    fl.check_add_sub_ok(server)


def test_default_limits_are_advertised(server):
    flood = hostile.stream_flood(HOST, server.grpc_port, 1)
    assert flood.advertised_max_streams == 128, flood


def test_inflight_bytes_budget(server_factory, model_repo):
    server = start(server_factory, model_repo, "--max-message-bytes", "1000000", "--max-inflight-bytes", "1500000")
    samples = fl.parse_metrics(server.metrics_text())
    assert fl.metric_sum(samples, "ferrite_inflight_request_bytes_limit") == 1500000
    hog = hostile.hold_http_body(HOST, server.http_port, 1_000_001, send=1_000_000)
    try:
        fl.wait_until(
            lambda: hostile.metric(HOST, server.metrics_port, "ferrite_inflight_request_bytes") >= 1_000_000,
            timeout=10, what="the held body to be counted",
        )
        answer = hostile.http_big_json_tensor(HOST, server.http_port, mib=0.57)
        assert answer.status == "429" and "--max-inflight-bytes" in answer.message, answer
        client = server.grpc_client()
        try:
            big = np.zeros((1, 150_000), dtype=np.float32)  # 600 KB on the wire
            with pytest.raises(InferenceServerException) as refused:
                fl.grpc_infer_add_sub(client, big, np.zeros((1, 16), dtype=np.float32), client_timeout=30)
            assert fl.grpc_status(refused.value) == "RESOURCE_EXHAUSTED", (refused.value.status(), refused.value.message())
            assert "--max-inflight-bytes" in refused.value.message(), refused.value
            fl.grpc_infer_add_sub(client)  # small requests still fit
        finally:
            client.close()
        assert hostile.metric(HOST, server.metrics_port, "ferrite_inflight_request_bytes_refused_total") >= 2
    finally:
        hog.close()
    fl.wait_until(
        lambda: hostile.metric(HOST, server.metrics_port, "ferrite_inflight_request_bytes") == 0,
        timeout=10, what="the budget to be given back",
    )
    answer = hostile.http_big_json_tensor(HOST, server.http_port, mib=0.57)
    assert answer.status == "400", answer


def test_a_body_that_never_ends_is_timed_out(server_factory, model_repo):
    server = start(server_factory, model_repo, "--body-read-timeout-seconds", "2")
    answer = hostile.slow_body(HOST, server.http_port, wait_s=10)
    assert answer.status == "408" and "--body-read-timeout-seconds" in answer.message, answer
    assert 1.5 < answer.seconds < 5, answer
    answer = hostile.grpc_slow_message(HOST, server.grpc_port, wait_s=8)
    assert answer.status == "DEADLINE_EXCEEDED" and "--body-read-timeout-seconds" in answer.message, answer
    assert 1.5 < answer.seconds < 5, answer
