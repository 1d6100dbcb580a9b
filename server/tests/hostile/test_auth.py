"""Attacks on a server started with `--api-key-file`: guessing keys, and
sending big bodies without one (refused before the body is read)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

import ferrite_testlib as fl
from siege import Siege

KEY = "hostile-suite-key-0123456789abcdef"
GOOD = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed(target_factory, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# the hostile suite's key\n{KEY}\n")
    return target_factory(["--api-key-file", str(keys)], name="keyed")


def test_guessing_keys(keyed):
    import tritonclient.grpc as grpcclient

    server = keyed.get()
    guesses = [f"Bearer {KEY[:-1]}{c}" for c in "0123456789ghijklmnopqrstuvwxyz"] * 20

    def guess_http(header):
        return server.http_request("POST", "/v2/models/add_sub/infer", b"{}", {"Authorization": header})[0]

    def guess_grpc(header):
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            fl.grpc_infer_add_sub(client, headers={"authorization": header})
            return "OK"
        except Exception as refused:  # noqa: BLE001
            return fl.grpc_status(refused)
        finally:
            client.close()

    with Siege(server, f"{2 * len(guesses)} wrong API keys (HTTP + gRPC, 8 at once)", rss_growth_bound_mib=64,
               headers=GOOD) as siege:
        with ThreadPoolExecutor(8) as pool:
            http = set(pool.map(guess_http, guesses))
            grpc = set(pool.map(guess_grpc, guesses[: len(guesses) // 4]))
        siege.outcome = f"HTTP {','.join(map(str, sorted(http)))}; gRPC {','.join(sorted(grpc))}"
    assert http == {401} and grpc == {"UNAUTHENTICATED"}, (http, grpc)


def test_big_bodies_without_a_key(keyed):
    server = keyed.get()
    body = 60 * 1024 * 1024  # announced, never sent: the key check comes first

    def post_without_key(_):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
            s.sendall(
                f"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {body}\r\n\r\n".encode() + b"[" * 65536
            )
            return s.recv(64).split(b" ")[1].decode()

    with Siege(server, "50 x 60 MiB bodies without a key", rss_growth_bound_mib=64, headers=GOOD) as siege:
        with ThreadPoolExecutor(10) as pool:
            statuses = set(pool.map(post_without_key, range(50)))
        siege.outcome = "HTTP " + ",".join(sorted(statuses)) + " before the body"
    assert statuses == {"401"}, statuses
