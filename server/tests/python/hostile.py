"""Attacks on a running ferrite-server, one function each, for the tests of
bounded decoding (test_limits.py) and `make test-hostile`.

Every function takes the host and the port it attacks, performs one attack,
and returns what the server did, in plain values (status, message, seconds,
counts). Nothing here knows how the server was started.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Answer:
    """What the server answered an attack."""

    status: str  # gRPC status name, or the HTTP status code as text
    message: str
    seconds: float


# ------------------------------------------------------------------ helpers
def vm_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss(pid: int) -> None:
    """Resets VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def grpc_raw_call(host: str, port: int, message: bytes, timeout: float = 60.0) -> Answer:
    """Sends `message` (encoded protobuf) as a ModelInferRequest."""
    import grpc

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(f"{host}:{port}", options=options) as channel:
        call = channel.unary_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
        start = time.monotonic()
        try:
            call(message, timeout=timeout)
            return Answer("OK", "", time.monotonic() - start)
        except grpc.RpcError as error:
            return Answer(error.code().name, error.details() or "", time.monotonic() - start)


def http_post(host: str, port: int, path: str, body: bytes, timeout: float = 60.0) -> Answer:
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    start = time.monotonic()
    try:
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading the whole body; read its answer
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
        return Answer(str(response.status), text[:500], time.monotonic() - start)
    finally:
        connection.close()


# ------------------------------------------------------------------ attacks
def grpc_empty_inputs(host: str, port: int, count: int = 2_000_000, model: str = "add_sub") -> Answer:
    """A ModelInfer of `count` empty `inputs` entries: 2 bytes each on the
    wire, ~300 bytes each once decoded (3.8 MiB -> ~600 MiB unbounded)."""
    message = _field(1, model.encode()) + bytes([0x2A, 0x00]) * count
    return grpc_raw_call(host, port, message)


def http_big_json_tensor(host: str, port: int, mib: float = 11.4, model: str = "add_sub") -> Answer:
    """A JSON tensor of one-digit elements ("1,": 2 bytes each); through a
    `serde_json::Value` each took ~40 bytes."""
    count = int(mib * 1024 * 1024 / 2)
    data = ",".join(["1"] * count)
    body = (
        '{"inputs": [{"name": "INPUT0", "shape": [%d], "datatype": "FP32", "data": [%s]}]}' % (count, data)
    ).encode()
    return http_post(host, port, f"/v2/models/{model}/infer", body)


def open_sockets(host: str, port: int, n: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """Opens `n` connections and sends each `first_bytes` (maybe nothing)."""
    sockets = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        if first_bytes:
            s.sendall(first_bytes)
        sockets.append(s)
    return sockets


def still_open(sockets: list[socket.socket]) -> int:
    """How many of `sockets` the server has not closed. Whatever the server
    sent is read and dropped (an HTTP/2 server sends its SETTINGS first)."""
    count = 0
    for s in sockets:
        s.setblocking(False)
        try:
            while s.recv(1 << 16):
                pass
            # An empty read: the server closed it.
        except BlockingIOError:
            count += 1  # nothing more to read, and not closed
        except OSError:
            pass  # reset: closed
    return count


def close_all(sockets: list[socket.socket]) -> None:
    for s in sockets:
        try:
            s.close()
        except OSError:
            pass


HALF_HTTP1_HEADER = b"POST /v2/models/add_sub/infer HTTP/1.1\r\nHost: ferrite\r\nContent-Ty"
HALF_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\n"


def half_headers(host: str, port: int, n: int = 300, wait_s: float = 22.0, grpc: bool = False) -> int:
    """`n` connections that send half a request header (HTTP/1) or half the
    HTTP/2 preface (gRPC), then nothing. Returns how many are still open
    after `wait_s`."""
    sockets = open_sockets(host, port, n, HALF_HTTP2_PREFACE if grpc else HALF_HTTP1_HEADER)
    try:
        time.sleep(wait_s)
        return still_open(sockets)
    finally:
        close_all(sockets)


def connection_flood(host: str, port: int, n: int) -> tuple[list[socket.socket], int]:
    """Opens `n` idle connections; returns them and how many of them the
    server closed at once (beyond its connection limit)."""
    sockets = open_sockets(host, port, n)
    time.sleep(0.5)
    return sockets, n - still_open(sockets)


# HTTP/2 by hand: just enough to open streams and read the server's answers.
FRAME_HEADERS, FRAME_RST_STREAM, FRAME_SETTINGS, FRAME_GOAWAY = 0x1, 0x3, 0x4, 0x7
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
REFUSED_STREAM = 0x7


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _read_frames(s: socket.socket, seconds: float) -> list[tuple[int, int, int, bytes]]:
    s.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(1 << 16)
        except socket.timeout:
            continue
        if not chunk:
            break
        data += chunk
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if len(data) < 9 + length:
            break
        kind, flags = data[3], data[4]
        stream = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


@dataclass
class StreamFlood:
    advertised_max_streams: int | None  # SETTINGS_MAX_CONCURRENT_STREAMS the server sent
    refused: int  # streams answered RST_STREAM(REFUSED_STREAM)
    goaway: bool


def stream_flood(host: str, port: int, n: int, path: str = INFER_METHOD) -> StreamFlood:
    """Opens `n` HTTP/2 streams on one connection (request headers, no body,
    never finished) and reports how many the server refused."""
    s = socket.create_connection((host, port), timeout=10)
    try:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(FRAME_SETTINGS, 0, 0))
        frames = _read_frames(s, 0.5)
        advertised = None
        for kind, flags, _, payload in frames:
            if kind == FRAME_SETTINGS and not flags & 0x1:
                for i in range(0, len(payload) - 5, 6):
                    ident, value = struct.unpack(">HI", payload[i : i + 6])
                    if ident == SETTINGS_MAX_CONCURRENT_STREAMS:
                        advertised = value
        s.sendall(_frame(FRAME_SETTINGS, 0x1, 0))  # ACK
        block = (
            b"\x83\x86"  # :method POST, :scheme http
            + b"\x04" + bytes([len(path)]) + path.encode()  # :path
            + b"\x01\x07ferrite"  # :authority
            + _literal(b"content-type", b"application/grpc")
            + _literal(b"te", b"trailers")
        )
        s.sendall(b"".join(_frame(FRAME_HEADERS, 0x4, 2 * i + 1, block) for i in range(n)))
        frames = _read_frames(s, 1.5)
        refused = sum(
            1 for kind, _, _, payload in frames
            if kind == FRAME_RST_STREAM and int.from_bytes(payload[:4], "big") == REFUSED_STREAM
        )
        return StreamFlood(advertised, refused, any(kind == FRAME_GOAWAY for kind, *_ in frames))
    finally:
        s.close()


def hold_http_body(host: str, port: int, declared: int, send: int = 10,
                   path: str = "/v2/models/add_sub/infer") -> socket.socket:
    """Starts a POST that declares `declared` body bytes, sends `send` of
    them and stalls: the bytes received stay held on the in-flight budget.
    Close the socket to let go."""
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: ferrite\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n".encode()
        + (b'{"inputs":' + b" " * send)[:send]
    )
    return s


def slow_body(host: str, port: int, wait_s: float, path: str = "/v2/models/add_sub/infer") -> Answer:
    """A POST whose body never finishes; returns what the server answers
    (within `wait_s`)."""
    s = hold_http_body(host, port, 1000, path=path)
    start = time.monotonic()
    try:
        s.settimeout(wait_s)
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            return Answer("no answer", "", time.monotonic() - start)
        head, _, body = data.partition(b"\r\n\r\n")
        status = head.split(b" ")[1].decode() if head else "closed"
        return Answer(status, body.decode(errors="replace"), time.monotonic() - start)
    finally:
        s.close()


def grpc_slow_message(host: str, port: int, wait_s: float) -> Answer:
    """A unary ModelInfer call whose message does not come for `wait_s`
    (sent as a client stream so that the headers go first)."""
    import grpc

    def late():
        time.sleep(wait_s)
        yield _field(1, b"add_sub")

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.stream_unary(INFER_METHOD, request_serializer=None, response_deserializer=None)
        start = time.monotonic()
        try:
            call(late(), timeout=wait_s + 30)
            return Answer("OK", "", time.monotonic() - start)
        except grpc.RpcError as error:
            return Answer(error.code().name, error.details() or "", time.monotonic() - start)


def huge_header(host: str, port: int, kib: int = 1024) -> Answer:
    """A GET whose headers take `kib` KiB (one long header line after another)."""
    s = socket.create_connection((host, port), timeout=10)
    start = time.monotonic()
    try:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: ferrite\r\n")
        line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        try:
            for _ in range(kib):
                s.sendall(line)
            s.sendall(b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while sending
        try:
            data = s.recv(1 << 16)
        except (ConnectionResetError, socket.timeout):
            data = b""
        status = data.split(b" ")[1].decode() if data.startswith(b"HTTP/") else "closed"
        return Answer(status, "", time.monotonic() - start)
    finally:
        s.close()


def metric(host: str, metrics_port: int, name: str) -> float:
    """The value of an unlabelled metric of the server."""
    import urllib.request

    text = urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)

