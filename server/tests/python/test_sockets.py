"""Every connection the server accepts, on all three ports, has TCP_NODELAY
set. Without it a small response waits for the client's delayed ACK: grpc-go
clients (ghz, Go microservices) waited ~40 ms per unary call.

The check reads the option on the server's own socket: the test finds the
accepted socket among the server's file descriptors (by its address pair in
/proc/net/tcp) and copies it into this process with pidfd_getfd(2), which
Linux allows to a parent for its child, so nothing is inferred from timing."""

from __future__ import annotations

import ctypes
import os
import socket

import pytest

import ferrite_testlib as fl

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def _server_socket_inode(port: int, peer_port: int) -> int:
    """Inode of the established socket 127.0.0.1:port <-> 127.0.0.1:peer_port
    (the server's end), 0 while it is not yet accepted."""
    local = f"0100007F:{port:04X}"
    remote = f"0100007F:{peer_port:04X}"
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[9])
    return 0


def _fd_of_inode(pid: int, inode: int) -> int | None:
    target = f"socket:[{inode}]"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return int(fd)
        except OSError:
            continue
    return None


def _nodelay_of_server_end(server, client: socket.socket, port: int) -> int:
    peer_port = client.getsockname()[1]
    fd = fl.wait_until(
        lambda: (inode := _server_socket_inode(port, peer_port)) and _fd_of_inode(server.proc.pid, inode),
        timeout=10,
        what=f"the server to accept the connection on port {port}",
    )
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(server.proc.pid)
    try:
        copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            errno = ctypes.get_errno()
            fl.missing(f"pidfd_getfd on the server's socket failed: {os.strerror(errno)}")
        server_end = socket.socket(fileno=copy)
        try:
            return server_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            server_end.close()
    finally:
        os.close(pidfd)


def _say_hello(sock: socket.socket, port_name: str) -> None:
    """Speaks first on the connection, so the server has surely accepted it."""
    if port_name == "grpc":
        sock.sendall(HTTP2_PREFACE)
        kind = sock.recv(9)[3]
        assert kind == 4, f"the gRPC port answered the HTTP/2 preface with frame type {kind}, not SETTINGS"
    else:
        path = "/metrics" if port_name == "metrics" else "/v2/health/live"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert sock.recv(12).startswith(b"HTTP/1.1 200"), f"{port_name} port did not answer 200"


@pytest.mark.parametrize("port_name", ["grpc", "http", "metrics"])
def test_accepted_sockets_have_tcp_nodelay(server, port_name):
    port = {"grpc": server.grpc_port, "http": server.http_port, "metrics": server.metrics_port}[port_name]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        _say_hello(client, port_name)
        assert _nodelay_of_server_end(server, client, port) == 1, (
            f"the server's end of a {port_name} connection has TCP_NODELAY off"
        )
