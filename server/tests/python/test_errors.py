"""Bad inputs: the right status code (gRPC / HTTP), a message naming the
problem, and a good request still succeeding afterwards."""

from __future__ import annotations

import json
import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

import ferrite_testlib as fl
from conftest import MAX_MESSAGE_BYTES

TRANSPORTS = ["grpc", "http"]


@pytest.fixture(autouse=True)
def still_answers(server):
    yield
    fl.check_add_sub_ok(server)


def _mk(transport, name, shape, dt, data=None):
    mod = grpcclient if transport == "grpc" else httpclient
    inp = mod.InferInput(name, list(shape), dt)
    if data is None:
        data = np.ones(shape, dtype=np.float32 if dt == "FP32" else None)
    inp.set_data_from_numpy(data)
    return inp


def _client(server, transport):
    return server.grpc_client() if transport == "grpc" else server.http_client()


def _expect(transport, grpc_code, http_status, *must):
    if transport == "grpc":
        return fl.expect_grpc_error(grpc_code, *must)
    return fl.expect_http_error(http_status, *must)


def _f32(shape):
    return np.ones(shape, np.float32)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_model(server, transport):
    c = _client(server, transport)
    with _expect(transport, "NOT_FOUND", 404, "no_such_model"):
        c.infer("no_such_model", [_mk(transport, "INPUT0", [1, 16], "FP32", _f32([1, 16]))])
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_version(server, transport):
    c = _client(server, transport)
    ins = [_mk(transport, n, [1, 16], "FP32", _f32([1, 16])) for n in ("INPUT0", "INPUT1")]
    with _expect(transport, "NOT_FOUND", 404, "add_sub"):
        c.infer("add_sub", ins, model_version="7")
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_missing_input(server, transport):
    c = _client(server, transport)
    with _expect(transport, "INVALID_ARGUMENT", 400, "INPUT1"):
        c.infer("add_sub", [_mk(transport, "INPUT0", [1, 16], "FP32", _f32([1, 16]))])
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_extra_input(server, transport):
    c = _client(server, transport)
    ins = [_mk(transport, n, [1, 16], "FP32", _f32([1, 16])) for n in ("INPUT0", "INPUT1", "INPUT2")]
    with _expect(transport, "INVALID_ARGUMENT", 400, "INPUT2"):
        c.infer("add_sub", ins)
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_misnamed_input(server, transport):
    c = _client(server, transport)
    ins = [_mk(transport, n, [1, 16], "FP32", _f32([1, 16])) for n in ("INPUT0", "input_1")]
    with _expect(transport, "INVALID_ARGUMENT", 400) as ei:
        c.infer("add_sub", ins)
    msg = ei.value.message()
    assert "input_1" in msg or "INPUT1" in msg, msg
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_duplicate_input(server, transport):
    c = _client(server, transport)
    ins = [_mk(transport, n, [1, 16], "FP32", _f32([1, 16])) for n in ("INPUT0", "INPUT0", "INPUT1")]
    with _expect(transport, "INVALID_ARGUMENT", 400, "INPUT0"):
        c.infer("add_sub", ins)
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_datatype(server, transport):
    c = _client(server, transport)
    ins = [
        _mk(transport, "INPUT0", [1, 16], "INT32", np.ones((1, 16), np.int32)),
        _mk(transport, "INPUT1", [1, 16], "FP32", _f32([1, 16])),
    ]
    with _expect(transport, "INVALID_ARGUMENT", 400, "INPUT0"):
        c.infer("add_sub", ins)
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("shape", [[1, 15], [16], [1, 1, 16], [0, 16, 1]], ids=str)
def test_wrong_shape(server, transport, shape):
    c = _client(server, transport)
    ins = [
        _mk(transport, "INPUT0", shape, "FP32", _f32(shape)),
        _mk(transport, "INPUT1", [1, 16], "FP32", _f32([1, 16])),
    ]
    with _expect(transport, "INVALID_ARGUMENT", 400, "INPUT0"):
        c.infer("add_sub", ins)
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_shape_fixed_model(server, transport):
    c = _client(server, transport)
    with _expect(transport, "INVALID_ARGUMENT", 400, "INPUT0"):
        c.infer("fixed", [_mk(transport, "INPUT0", [3, 2], "FP32", _f32([3, 2]))])
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_batch_larger_than_max_batch_size(server, transport):
    # mlp: max_batch_size 8 (ferrite.json); 9 rows must be refused like Triton does.
    c = _client(server, transport)
    with _expect(transport, "INVALID_ARGUMENT", 400):
        c.infer("mlp", [_mk(transport, "INPUT0", [9, 16], "FP32", _f32([9, 16]))])
    c.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_raw_length_does_not_match_shape(server, transport):
    c = _client(server, transport)
    i0 = _mk(transport, "INPUT0", [1, 16], "FP32", _f32([1, 16]))
    i0.set_shape([1, 15])  # 64 bytes of data for a 60-byte shape
    ins = [i0, _mk(transport, "INPUT1", [1, 15], "FP32", _f32([1, 15]))]
    with _expect(transport, "INVALID_ARGUMENT", 400, "INPUT0"):
        c.infer("add_sub", ins)
    c.close()


def _grpc_stub(server):
    ch = grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", -1)])
    return ch, service_pb2_grpc.GRPCInferenceServiceStub(ch)


def _grpc_call_expect(server, req, code, *must):
    ch, stub = _grpc_stub(server)
    try:
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(req, timeout=60)
    finally:
        ch.close()
    assert ei.value.code().name == code, f"expected {code}, got {ei.value.code().name}: {ei.value.details()!r}"
    for s in must:
        assert s in (ei.value.details() or ""), f"message should mention {s!r}: {ei.value.details()!r}"
    return ei.value.details()


def test_grpc_raw_length_short(server):
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for n in ("INPUT0", "INPUT1"):
        req.inputs.add(name=n, datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(b"\0" * 63)
    req.raw_input_contents.append(b"\0" * 64)
    _grpc_call_expect(server, req, "INVALID_ARGUMENT", "INPUT0")


def test_grpc_raw_contents_count_mismatch(server):
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for n in ("INPUT0", "INPUT1"):
        req.inputs.add(name=n, datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(b"\0" * 64)  # only one buffer for two inputs
    _grpc_call_expect(server, req, "INVALID_ARGUMENT")


def test_grpc_typed_count_mismatch(server):
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    t0 = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    t0.contents.fp32_contents.extend([1.0] * 15)
    t1 = req.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    t1.contents.fp32_contents.extend([1.0] * 16)
    _grpc_call_expect(server, req, "INVALID_ARGUMENT", "INPUT0")


def test_grpc_typed_wrong_field(server):
    # FP32 input whose values are in int_contents
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    t0 = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    t0.contents.int_contents.extend([1] * 16)
    t1 = req.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    t1.contents.fp32_contents.extend([1.0] * 16)
    _grpc_call_expect(server, req, "INVALID_ARGUMENT", "INPUT0")


def test_grpc_typed_and_raw_mixed(server):
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    t0 = req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    t0.contents.fp32_contents.extend([1.0] * 16)
    req.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(np.ones(16, np.float32).tobytes())
    _grpc_call_expect(server, req, "INVALID_ARGUMENT")


def test_grpc_unknown_datatype_string(server):
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for n in ("INPUT0", "INPUT1"):
        req.inputs.add(name=n, datatype="FLOAT32", shape=[1, 16])
        req.raw_input_contents.append(b"\0" * 64)
    _grpc_call_expect(server, req, "INVALID_ARGUMENT", "FLOAT32")


def test_grpc_negative_dim(server):
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for n in ("INPUT0", "INPUT1"):
        req.inputs.add(name=n, datatype="FP32", shape=[-1, 16])
        req.raw_input_contents.append(b"\0" * 64)
    _grpc_call_expect(server, req, "INVALID_ARGUMENT", "INPUT0")


BAD_BYTES_BLOBS = {
    "prefix_past_end": struct.pack("<I", 100) + b"abc",
    "truncated_prefix": struct.pack("<I", 1) + b"a" + b"\x01\x00",
    "too_few_elements": struct.pack("<I", 1) + b"a",  # shape says 2 elements
    "trailing_bytes": struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + b"zz",
}


@pytest.mark.parametrize("case", list(BAD_BYTES_BLOBS))
def test_grpc_malformed_bytes(server, case):
    req = service_pb2.ModelInferRequest(model_name="strings")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(BAD_BYTES_BLOBS[case])
    _grpc_call_expect(server, req, "INVALID_ARGUMENT", "INPUT0")


@pytest.mark.parametrize("case", list(BAD_BYTES_BLOBS))
def test_http_malformed_bytes(server, case):
    blob = BAD_BYTES_BLOBS[case]
    header = json.dumps(
        {"inputs": [{"name": "INPUT0", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}]}
    ).encode()
    status_body = server.http_request(
        "POST", "/v2/models/strings/infer", header + blob, {"Inference-Header-Content-Length": str(len(header))}
    )
    fl.assert_json_error(status_body, 400, "INPUT0")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_message_over_max_message_bytes(server, transport):
    big = np.array([b"x" * (MAX_MESSAGE_BYTES + 1024 * 1024)], dtype=np.object_)
    c = _client(server, transport)
    mod = grpcclient if transport == "grpc" else httpclient
    inp = mod.InferInput("INPUT0", [1], "BYTES")
    inp.set_data_from_numpy(big)
    with _expect(transport, "INVALID_ARGUMENT", 400):
        c.infer("strings", [inp])
    c.close()


def test_http_malformed_json(server):
    fl.assert_json_error(server.http_request("POST", "/v2/models/add_sub/infer", b"{not json"), 400)
    fl.assert_json_error(server.http_request("POST", "/v2/models/add_sub/infer", b'{"inputs": 5}'), 400)


def test_http_json_data_count_mismatch(server):
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 15},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        ]
    }
    fl.assert_json_error(server.http_request("POST", "/v2/models/add_sub/infer", json.dumps(body).encode()), 400, "INPUT0")


def test_http_json_wrong_value_type(server):
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": ["a"] * 16},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
        ]
    }
    fl.assert_json_error(server.http_request("POST", "/v2/models/add_sub/infer", json.dumps(body).encode()), 400, "INPUT0")


def test_http_header_length_past_body(server):
    header = b'{"inputs": []}'
    fl.assert_json_error(
        server.http_request("POST", "/v2/models/add_sub/infer", header, {"Inference-Header-Content-Length": "5000"}), 400
    )


def test_http_binary_size_past_body(server):
    header = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
            ]
        }
    ).encode()
    body = header + b"\0" * 100  # 28 bytes short
    fl.assert_json_error(
        server.http_request("POST", "/v2/models/add_sub/infer", body, {"Inference-Header-Content-Length": str(len(header))}),
        400,
    )


def test_http_binary_size_mismatch_shape(server):
    header = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 60}},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
            ]
        }
    ).encode()
    body = header + b"\0" * 124
    fl.assert_json_error(
        server.http_request("POST", "/v2/models/add_sub/infer", body, {"Inference-Header-Content-Length": str(len(header))}),
        400,
        "INPUT0",
    )


def test_many_bad_requests_then_good(server):
    """A burst of assorted bad requests; the server keeps answering correctly."""
    c = server.grpc_client()
    try:
        for i in range(30):
            kind = i % 3
            try:
                if kind == 0:
                    c.infer("add_sub", [_mk("grpc", "INPUT0", [1, 16], "FP32", _f32([1, 16]))])
                elif kind == 1:
                    c.infer("nope", [_mk("grpc", "INPUT0", [1, 16], "FP32", _f32([1, 16]))])
                else:
                    c.infer("fixed", [_mk("grpc", "INPUT0", [2, 2], "FP32", _f32([2, 2]))])
                raise AssertionError(f"bad request {i} succeeded")
            except InferenceServerException as e:
                assert fl.grpc_status(e) in ("INVALID_ARGUMENT", "NOT_FOUND"), e
        res, a, b = fl.grpc_infer_add_sub(c)
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
    finally:
        c.close()


@pytest.mark.parametrize("shape", [[2**62, 16], [2**31, 2**31, 16], [-5, 16]], ids=["huge", "overflow", "negative"])
def test_grpc_absurd_shapes(server, shape):
    req = service_pb2.ModelInferRequest(model_name="add_sub")
    for n in ("INPUT0", "INPUT1"):
        req.inputs.add(name=n, datatype="FP32", shape=shape)
        req.raw_input_contents.append(b"\0" * 64)
    _grpc_call_expect(server, req, "INVALID_ARGUMENT", "INPUT0")


@pytest.mark.parametrize("shape", [[2**62, 16], [2**31, 2**31, 16], [-5, 16]], ids=["huge", "overflow", "negative"])
def test_http_absurd_shapes(server, shape):
    body = {"inputs": [{"name": n, "shape": shape, "datatype": "FP32", "data": [1.0] * 16} for n in ("INPUT0", "INPUT1")]}
    fl.assert_json_error(server.http_request("POST", "/v2/models/add_sub/infer", json.dumps(body).encode()), 400, "INPUT0")


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_bytes_not_utf8_pass_through(server, transport):
    """BYTES elements that are not UTF-8 reach the model and come back exactly
    (as Triton passes them: ONNX string tensors hold any bytes but NUL)."""
    vals = [b"\xff\xferaw", b"ok", b"\xc3", b"", b"\x80" * 300, "caf\u00e9".encode("latin-1"), b"\xed\xa0\x80", b"z"]
    x = np.array(vals, dtype=np.object_).reshape(2, 4)
    client = server.grpc_client() if transport == "grpc" else server.http_client()
    module = grpcclient if transport == "grpc" else httpclient
    try:
        inp = module.InferInput("INPUT0", [2, 4], "BYTES").set_data_from_numpy(x)  # HTTP: binary data
        outputs = None if transport == "grpc" else [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)]
        res = client.infer("identity_bytes", [inp], outputs=outputs)
        assert [bytes(v) for v in res.as_numpy("OUTPUT0").ravel()] == vals
    finally:
        client.close()


def test_bytes_with_nul_refused(server):
    """A NUL cannot cross ONNX Runtime's C string API: INVALID_ARGUMENT that
    names the input, the element and the reason; the model keeps serving."""
    vals = [b"ok", b"a\x00b", b"\xff", b"x"]
    x = np.array(vals, dtype=np.object_).reshape(1, 4)
    c = server.grpc_client()
    try:
        with fl.expect_grpc_error("INVALID_ARGUMENT", "INPUT0", "element 1", "NUL"):
            c.infer("identity_bytes", [grpcclient.InferInput("INPUT0", [1, 4], "BYTES").set_data_from_numpy(x)])
        ok = np.array([b"a", b"b", b"c", b"d"], dtype=np.object_).reshape(1, 4)
        res = c.infer("identity_bytes", [grpcclient.InferInput("INPUT0", [1, 4], "BYTES").set_data_from_numpy(ok)])
        assert [bytes(v) for v in res.as_numpy("OUTPUT0").ravel()] == [b"a", b"b", b"c", b"d"]
    finally:
        c.close()


def test_load_broken_model(server, model_repo):
    name = "broken_model"
    (model_repo / name / "1").mkdir(parents=True)
    (model_repo / name / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    c = server.grpc_client()
    try:
        with pytest.raises(InferenceServerException) as ei:
            c.load_model(name)
        assert name in ei.value.message(), ei.value
        assert fl.grpc_status(ei.value) in ("INVALID_ARGUMENT", "INTERNAL", "FAILED_PRECONDITION", "UNAVAILABLE"), ei.value
        try:
            assert c.is_model_ready(name) is False
        except InferenceServerException as e:
            assert fl.grpc_status(e) == "NOT_FOUND"
        assert c.is_server_live()
    finally:
        import shutil

        shutil.rmtree(model_repo / name)
        try:
            c.unload_model(name)
        except InferenceServerException:
            pass
    try:
        # once the failed model is unloaded, the server is ready again
        assert c.is_server_ready() is True
        assert server.http_get("/v2/health/ready")[0] == 200
    finally:
        c.close()
