"""TLS, mutual TLS and API keys against real clients (tritonclient gRPC and
HTTP, plain grpcio, urllib), with a CA, server and client certificates made
here by the openssl command line.

* `--tls-cert/--tls-key` + `--api-key-file`: plaintext clients are refused
  on both ports; no key or a wrong key gets UNAUTHENTICATED / 401 with
  `WWW-Authenticate: Bearer`; the right key works; health needs no key; the
  metrics port stays plain HTTP without a key and answers the probes' paths.
* `--tls-client-ca`: a client without a certificate, or with one from
  another CA, cannot connect; one signed by the CA can.
"""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

import ferrite_testlib as fl

tm = fl.make_test_models
KEYS = ["key-one", "key-two"]
KEY_FILE = "# API keys of the test server\n\nkey-one\n  key-two  \n# key-commented-out\n"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d, name):
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d, name, ca, usage):
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    (d / f"{name}.ext").write_text(
        f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca -> server, client; rogue_ca -> rogue_client. Returns name -> path."""
    if shutil.which("openssl") is None:
        fl.missing("the openssl command line (makes the test certificates)")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "rogue_ca")
    _make_leaf(d, "server", "ca", "serverAuth")
    _make_leaf(d, "client", "ca", "clientAuth")
    _make_leaf(d, "rogue_client", "rogue_ca", "clientAuth")
    return {p.stem + p.suffix.replace(".", "_"): str(p) for p in d.iterdir()}


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("tls_repo")
    tm._save(repo, "add_sub", tm.make_add_sub())
    return repo


def _metrics_get(server, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError:
        return 0


def _start_tls_server(args, logs_dir, name):
    """Starts a server whose API ports speak TLS only: readiness is read on
    the metrics port, in plain HTTP, as the operator's probes read it."""
    s = fl.FerriteServer(args, logs_dir, name=name)
    s.start(wait=False)
    fl.wait_until(lambda: _metrics_get(s, "/v2/models/add_sub/ready") == 200 or not s.alive(), what=f"{name} ready")
    assert s.alive(), s.log_tail()
    return s


def _stop(s):
    rc = s.terminate()
    assert rc == 0, f"{s.name} exited with {rc} after SIGTERM\n{s.log_tail()}"


@pytest.fixture(scope="module")
def tls_server(pki, small_repo, logs_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(KEY_FILE)
    s = _start_tls_server(
        ["--model-repository", str(small_repo), "--tls-cert", pki["server_crt"], "--tls-key", pki["server_key"],
         "--api-key-file", str(keys)],
        logs_dir, "tls_api_keys",
    )  # fmt: skip
    yield s
    _stop(s)
    assert not any(key in s.log_tail(10**6) for key in KEYS), "an API key was logged"


@pytest.fixture(scope="module")
def mtls_server(pki, small_repo, logs_dir):
    s = _start_tls_server(
        ["--model-repository", str(small_repo), "--tls-cert", pki["server_crt"], "--tls-key", pki["server_key"],
         "--tls-client-ca", pki["ca_crt"]],
        logs_dir, "mtls",
    )  # fmt: skip
    yield s
    _stop(s)


def _auth(key):
    return {"authorization": f"Bearer {key}"}


def _tls_grpc(server, pki, **kw):
    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=pki["ca_crt"], **kw)


def _tls_http(server, pki, **ssl_options):
    return httpclient.InferenceServerClient(
        server.http_url, ssl=True, ssl_options={"ca_certs": pki["ca_crt"], **ssl_options}, network_timeout=30
    )


def _add_sub_http_inputs():
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [httpclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for i in inputs:
        i.set_data_from_numpy(a)
    return inputs, a


# ---------------------------------------------------------------- TLS + API keys
def test_plaintext_clients_are_refused(tls_server):
    with grpc.insecure_channel(tls_server.grpc_url) as ch:
        with pytest.raises(grpc.RpcError) as ei:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    conn = http.client.HTTPConnection("127.0.0.1", tls_server.http_port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("GET", "/v2/health/live")
        conn.getresponse()
    conn.close()


def test_stalled_handshakes_hold_up_nobody(tls_server, pki):
    """Connections that never start their handshake do not delay others:
    each handshake runs on its own (and gives up after 10 s)."""
    import socket
    import time

    idle = [socket.create_connection(("127.0.0.1", port), timeout=5)
            for port in (tls_server.grpc_port, tls_server.http_port) for _ in range(8)]  # fmt: skip
    try:
        started = time.monotonic()
        c = _tls_grpc(tls_server, pki)
        assert c.is_server_live()
        c.close()
        context = ssl.create_default_context(cafile=pki["ca_crt"])
        with urllib.request.urlopen(f"https://127.0.0.1:{tls_server.http_port}/v2/health/live", context=context, timeout=10) as r:
            assert r.status == 200
        assert time.monotonic() - started < 5
    finally:
        for sock in idle:
            sock.close()


def test_grpc_api_keys(tls_server, pki):
    c = _tls_grpc(tls_server, pki)
    try:
        # Health and liveness/readiness need no key.
        assert c.is_server_live() and c.is_server_ready()
        with fl.expect_grpc_error("UNAUTHENTICATED", "API key"):
            fl.grpc_infer_add_sub(c)
        with fl.expect_grpc_error("UNAUTHENTICATED", "invalid API key"):
            fl.grpc_infer_add_sub(c, headers=_auth("key-three"))
        with fl.expect_grpc_error("UNAUTHENTICATED", "invalid API key"):
            fl.grpc_infer_add_sub(c, headers=_auth("key-commented-out"))
        with fl.expect_grpc_error("UNAUTHENTICATED"):
            c.get_model_metadata("add_sub", headers={"authorization": "key-one"})  # no scheme
        for key in KEYS:
            res, a, b = fl.grpc_infer_add_sub(c, headers=_auth(key))
            np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
        assert c.get_model_metadata("add_sub", headers=_auth("key-one")).name == "add_sub"
    finally:
        c.close()
    # Plain grpcio over TLS: the health service answers without a key.
    creds = grpc.ssl_channel_credentials(root_certificates=open(pki["ca_crt"], "rb").read())
    with grpc.secure_channel(tls_server.grpc_url, creds) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="add_sub"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, ei.value
        index = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(), timeout=10, metadata=[("authorization", "Bearer key-two")])
        assert [m.name for m in index.models] == ["add_sub"]


def test_http_api_keys(tls_server, pki):
    c = _tls_http(tls_server, pki)
    inputs, a = _add_sub_http_inputs()
    try:
        assert c.is_server_live() and c.is_server_ready()
        with fl.expect_http_error(401, "API key"):
            c.infer("add_sub", inputs)
        with fl.expect_http_error(401, "invalid API key"):
            c.infer("add_sub", inputs, headers=_auth("wrong"))
        res = c.infer("add_sub", inputs, headers=_auth("key-one"))
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + a)
    finally:
        c.close()
    # urllib over HTTPS: the 401 says how to authenticate.
    context = ssl.create_default_context(cafile=pki["ca_crt"])
    base = f"https://127.0.0.1:{tls_server.http_port}"
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(base + "/v2/models/add_sub", context=context, timeout=10)
    assert ei.value.code == 401 and ei.value.headers["WWW-Authenticate"] == "Bearer"
    assert "API key" in json.loads(ei.value.read())["error"]
    # Even an unauthenticated POST to load is refused before anything else.
    req = urllib.request.Request(base + "/v2/repository/models/add_sub/unload", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, context=context, timeout=10)
    assert ei.value.code == 401
    req = urllib.request.Request(base + "/v2/models/add_sub", headers=_auth("key-two"))
    with urllib.request.urlopen(req, context=context, timeout=10) as r:
        assert json.loads(r.read())["name"] == "add_sub"
    with urllib.request.urlopen(base + "/v2/health/ready", context=context, timeout=10) as r:
        assert r.status == 200


def test_metrics_port_stays_plain_and_open(tls_server):
    assert _metrics_get(tls_server, "/metrics") == 200
    assert _metrics_get(tls_server, "/v2/health/live") == 200
    assert _metrics_get(tls_server, "/v2/models/add_sub/ready") == 200
    assert _metrics_get(tls_server, "/v2/models/no_such_model/ready") == 404


# ------------------------------------------------------------------------ mTLS
def test_mtls_needs_a_client_certificate_from_the_ca(mtls_server, pki):
    root = open(pki["ca_crt"], "rb").read()

    def check(**cert):
        creds = grpc.ssl_channel_credentials(root_certificates=root, **cert)
        with grpc.secure_channel(mtls_server.grpc_url, creds) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

    for cert in ({}, {"private_key": open(pki["rogue_client_key"], "rb").read(),
                      "certificate_chain": open(pki["rogue_client_crt"], "rb").read()}):  # fmt: skip
        with pytest.raises(grpc.RpcError) as ei:
            check(**cert)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
    client = {"private_key": open(pki["client_key"], "rb").read(), "certificate_chain": open(pki["client_crt"], "rb").read()}
    assert check(**client) == health_pb2.HealthCheckResponse.SERVING

    # tritonclient gRPC and HTTP with the client certificate.
    c = _tls_grpc(mtls_server, pki, private_key=pki["client_key"], certificate_chain=pki["client_crt"])
    try:
        res, a, b = fl.grpc_infer_add_sub(c)
        np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
    finally:
        c.close()
    c = _tls_http(mtls_server, pki, certfile=pki["client_crt"], keyfile=pki["client_key"])
    inputs, a = _add_sub_http_inputs()
    try:
        np.testing.assert_array_equal(c.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + a)
    finally:
        c.close()
    # HTTPS without a client certificate fails in the handshake.
    context = ssl.create_default_context(cafile=pki["ca_crt"])
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        urllib.request.urlopen(f"https://127.0.0.1:{mtls_server.http_port}/v2/health/live", context=context, timeout=10).read()


def test_bad_tls_files_fail_at_startup(server_factory, small_repo, pki, tmp_path):
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    for args, message in (
        (["--tls-cert", str(empty), "--tls-key", pki["server_key"]], "holds no PEM certificate"),
        (["--tls-cert", pki["server_crt"], "--tls-key", pki["server_crt"]], "--tls-key"),
        (["--api-key-file", str(tmp_path / "missing")], "--api-key-file"),
    ):
        s = server_factory(["--model-repository", str(small_repo), *args], start=False)
        s.start(wait=False)
        assert s.proc.wait(timeout=30) != 0
        assert message in s.log_tail(), s.log_tail()
