"""Attacks on request decoding and on the connections of the server's ports,
against its default flags (32 MiB messages, 1,024 connections per port, 10 s
to send headers, 128 streams per HTTP/2 connection, an in-flight budget of
1/32 of memory)."""

from __future__ import annotations

import time

import hostile
from siege import Siege

HOST = "127.0.0.1"
HEADER_TIMEOUT_S = 10  # --header-read-timeout-seconds, default


def test_two_million_empty_inputs(target):
    server = target.get()
    with Siege(server, "gRPC ModelInfer of 2M empty inputs (3.8 MiB)", rss_growth_bound_mib=64) as siege:
        answer = hostile.grpc_empty_inputs(HOST, server.grpc_port)
        siege.outcome = f"gRPC {answer.status} in {answer.seconds:.2f} s"
    assert answer.status == "INVALID_ARGUMENT" and "degenerate" in answer.message, answer


def test_a_big_json_tensor_of_one_digit_elements(target):
    server = target.get()
    with Siege(server, "11.4 MiB JSON tensor of one-digit elements", rss_growth_bound_mib=128) as siege:
        answer = hostile.http_big_json_tensor(HOST, server.http_port)
        siege.outcome = f"HTTP {answer.status} in {answer.seconds:.2f} s"
    # Decoded typed, then refused by the model's shape.
    assert answer.status == "400", answer


def test_half_headers(target):
    server = target.get()
    with Siege(server, "300 HTTP/1 + 300 gRPC connections sending half a header", rss_growth_bound_mib=64) as siege:
        open_http = hostile.half_headers(HOST, server.http_port, n=300, wait_s=HEADER_TIMEOUT_S + 4)
        open_grpc = hostile.half_headers(HOST, server.grpc_port, n=300, wait_s=HEADER_TIMEOUT_S + 4, grpc=True)
        siege.outcome = f"still open after {HEADER_TIMEOUT_S + 4} s: {open_http} HTTP, {open_grpc} gRPC"
    assert open_http == 0 and open_grpc == 0, (open_http, open_grpc)


def test_stream_floods(target):
    server = target.get()
    with Siege(server, "1,000 HTTP/2 streams on one connection, both ports", rss_growth_bound_mib=64) as siege:
        grpc = hostile.stream_flood(HOST, server.grpc_port, 1000)
        http = hostile.stream_flood(HOST, server.http_port, 1000, path="/v2/models/add_sub/infer")
        siege.outcome = f"advertised {grpc.advertised_max_streams}; refused {grpc.refused} gRPC, {http.refused} HTTP streams"
    assert grpc.advertised_max_streams == 128 and grpc.refused > 0 and http.refused > 0, (grpc, http)


def test_connection_flood(target_factory):
    # The default cap (1,024 per port) at a smaller scale, so the test needs
    # few file descriptors.
    server = target_factory(["--max-connections", "64"], name="capped").get()
    with Siege(server, "200 idle connections against --max-connections 64", rss_growth_bound_mib=32) as siege:
        sockets, closed = hostile.connection_flood(HOST, server.http_port, 200)
        try:
            siege.outcome = f"{closed} closed at once"
        finally:
            hostile.close_all(sockets)
    # The good client's own connection holds a slot too.
    assert closed >= 200 - 64, closed


def test_slow_bodies_hold_only_what_they_sent(target):
    server = target.get()
    sockets = []
    with Siege(server, "100 POSTs declaring 30 MiB, sending 10 bytes, then stalling", rss_growth_bound_mib=64) as siege:
        try:
            sockets = [hostile.hold_http_body(HOST, server.http_port, 30 << 20) for _ in range(100)]
            time.sleep(1)
            held = hostile.metric(HOST, server.metrics_port, "ferrite_inflight_request_bytes")
            siege.outcome = f"{held:.0f} bytes held on the budget"
        finally:
            hostile.close_all(sockets)
    assert held < 1 << 20, held
