"""Every datatype through identity_<dtype> models, over four transports:

* grpc_raw    - tritonclient.grpc default (raw_input_contents)
* grpc_typed  - ModelInferRequest built by hand with typed `contents`, sent with
                the generated stub
* http_binary - tritonclient.http, binary data extension in and out
* http_json   - tritonclient.http, JSON `data` in and out

Not covered by design (the protocol has no way to express them, in Triton
either): FP16 and BF16 have no typed `contents` field in the gRPC protocol, and
tritonclient refuses BF16 as JSON (Triton does not accept BF16 in JSON).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bf16_tensor, deserialize_bytes_tensor, triton_to_np_dtype

import ferrite_testlib as fl

tm = fl.make_test_models

TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

BYTES_VALUES = [
    b"hello",
    b"",
    "héllo wörld".encode(),
    "日本語テキスト".encode(),
    "emoji 🦀".encode(),
    b"a" * 300,
    b"tab\tnew\nline",
    b" ",
]


def sample(dt: str) -> np.ndarray:
    if dt == "BOOL":
        return np.array([[True, False, True, False], [False, False, True, True]])
    if dt == "BYTES":
        return np.array(BYTES_VALUES, dtype=np.object_).reshape(2, 4)
    if dt == "BF16":  # float32 values exactly representable in bfloat16
        return np.array([[1.5, -2.0, 0.25, 3.0], [0.0, -128.0, 1024.0, 0.0078125]], np.float32)
    npdt = np.dtype(tm.DATATYPES[dt][1])
    if npdt.kind in "iu":
        info = np.iinfo(npdt)
        vals = [info.min, info.max, 0, 1, info.max // 3, 7, info.max - 1, 42 if npdt.kind == "u" else -42]
        return np.array(vals, dtype=npdt).reshape(2, 4)
    if npdt == np.float16:
        return np.array([[0.0, -0.0, 1.5, -2.25], [65504.0, 6.1035e-05, 0.333, 100.0]], np.float16)
    big = 3.0e38 if npdt == np.float32 else 1.0e300
    return np.array([[0.0, -1.25, np.pi, big], [-big, 1e-30, 123456.789, -0.5]], dtype=npdt)


def assert_same(got: np.ndarray, want: np.ndarray, dt: str):
    assert got is not None, "output missing"
    assert list(got.shape) == list(want.shape), (got.shape, want.shape)
    if dt == "BYTES":
        g = [x if isinstance(x, bytes) else str(x).encode() for x in got.ravel()]
        assert g == list(want.ravel())
    else:
        np.testing.assert_array_equal(got.astype(want.dtype), want)


def _grpc_raw(server, dt, x):
    c = server.grpc_client()
    try:
        inp = grpcclient.InferInput("INPUT0", list(x.shape), dt).set_data_from_numpy(x)
        res = c.infer(tm.identity_model_name(dt), [inp])
        out = res.get_response().outputs
        assert [(o.name, o.datatype, list(o.shape)) for o in out] == [("OUTPUT0", dt, list(x.shape))]
        return res.as_numpy("OUTPUT0")
    finally:
        c.close()


def decode_grpc_output(resp, index: int) -> np.ndarray:
    out = resp.outputs[index]
    shape = list(out.shape)
    dt = out.datatype
    if index < len(resp.raw_output_contents):
        raw = resp.raw_output_contents[index]
        if dt == "BYTES":
            arr = deserialize_bytes_tensor(raw)
        elif dt == "BF16":
            arr = deserialize_bf16_tensor(raw)
        else:
            arr = np.frombuffer(raw, dtype=triton_to_np_dtype(dt))
        return arr.reshape(shape)
    field = TYPED_FIELD[dt]
    vals = list(getattr(out.contents, field))
    return np.array(vals, dtype=np.object_ if dt == "BYTES" else triton_to_np_dtype(dt)).reshape(shape)


def typed_request(model: str, inputs: list[tuple[str, str, np.ndarray]]) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, dt, x in inputs:
        t = req.inputs.add(name=name, datatype=dt, shape=list(x.shape))
        getattr(t.contents, TYPED_FIELD[dt]).extend(x.ravel().tolist())
    return req


def _grpc_typed(server, dt, x):
    with grpc.insecure_channel(server.grpc_url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        resp = stub.ModelInfer(typed_request(tm.identity_model_name(dt), [("INPUT0", dt, x)]), timeout=60)
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("OUTPUT0", dt, list(x.shape))]
    return decode_grpc_output(resp, 0)


def _http(server, dt, x, binary):
    c = server.http_client()
    try:
        inp = httpclient.InferInput("INPUT0", list(x.shape), dt)
        inp.set_data_from_numpy(x, binary_data=binary)
        res = c.infer(
            tm.identity_model_name(dt), [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
        )
        out = res.get_response()["outputs"]
        assert [(o["name"], o["datatype"], o["shape"]) for o in out] == [("OUTPUT0", dt, list(x.shape))]
        got = res.as_numpy("OUTPUT0")
        if dt == "BYTES" and not binary:
            got = np.array([s.encode() if isinstance(s, str) else s for s in got.ravel()], dtype=np.object_).reshape(got.shape)
        return got
    finally:
        c.close()


CASES = []
for _dt in tm.DATATYPES:
    CASES.append(pytest.param(_dt, "grpc_raw", id=f"{_dt}-grpc_raw"))
    if _dt not in ("FP16", "BF16"):
        CASES.append(pytest.param(_dt, "grpc_typed", id=f"{_dt}-grpc_typed"))
    CASES.append(pytest.param(_dt, "http_binary", id=f"{_dt}-http_binary"))
    if _dt != "BF16":
        CASES.append(pytest.param(_dt, "http_json", id=f"{_dt}-http_json"))


@pytest.mark.parametrize("dt,transport", CASES)
def test_identity_roundtrip(server, dt, transport):
    x = sample(dt)
    if transport == "grpc_raw":
        got = _grpc_raw(server, dt, x)
    elif transport == "grpc_typed":
        got = _grpc_typed(server, dt, x)
    elif transport == "http_binary":
        got = _http(server, dt, x, True)
    else:
        got = _http(server, dt, x, False)
    assert_same(got, x, dt)


def test_identity_metadata_datatypes(grpc_client):
    for dt in tm.DATATYPES:
        md = grpc_client.get_model_metadata(tm.identity_model_name(dt))
        assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("INPUT0", dt, [-1, 4])], dt
        assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("OUTPUT0", dt, [-1, 4])], dt


def test_bf16_is_truncated_like_triton(server):
    # tritonclient sends the upper 16 bits of each float32: 1.0000001 -> 1.0
    x = np.array([[1.0000001, 2.0039063, -3.5, 0.1]] * 2, np.float32)
    got = _grpc_raw(server, "BF16", x)
    want = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("transport", ["grpc_raw", "grpc_typed", "http_binary", "http_json"])
def test_strings_model(server, transport):
    vals = BYTES_VALUES
    x = np.array(vals, dtype=np.object_)
    ref = tm.strings_reference(vals)
    if transport == "grpc_raw":
        c = server.grpc_client()
        try:
            res = c.infer("strings", [grpcclient.InferInput("INPUT0", [len(vals)], "BYTES").set_data_from_numpy(x)])
            o0, o1 = res.as_numpy("OUTPUT0"), res.as_numpy("OUTPUT1")
        finally:
            c.close()
    elif transport == "grpc_typed":
        with grpc.insecure_channel(server.grpc_url) as ch:
            resp = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                typed_request("strings", [("INPUT0", "BYTES", x)]), timeout=60
            )
        names = [o.name for o in resp.outputs]
        o0 = decode_grpc_output(resp, names.index("OUTPUT0"))
        o1 = decode_grpc_output(resp, names.index("OUTPUT1"))
    else:
        binary = transport == "http_binary"
        c = server.http_client()
        try:
            inp = httpclient.InferInput("INPUT0", [len(vals)], "BYTES")
            inp.set_data_from_numpy(x, binary_data=binary)
            outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
            res = c.infer("strings", [inp], outputs=outs)
            o0, o1 = res.as_numpy("OUTPUT0"), res.as_numpy("OUTPUT1")
        finally:
            c.close()
        if not binary:
            o0 = np.array([s.encode() if isinstance(s, str) else s for s in o0], dtype=np.object_)
    assert [bytes(v) for v in o0] == list(ref["OUTPUT0"])
    np.testing.assert_array_equal(o1.astype(bool), ref["OUTPUT1"])


def test_many_strings_one_request(server):
    # 32 strings (the default max batch size) of varying length in one request:
    # checks offsets in the BYTES codec.
    vals = [("x" * (i * 7) + "é" * (i % 3)).encode() for i in range(32)]
    c = server.grpc_client()
    try:
        x = np.array(vals, dtype=np.object_)
        res = c.infer("strings", [grpcclient.InferInput("INPUT0", [len(vals)], "BYTES").set_data_from_numpy(x)])
        assert [bytes(v) for v in res.as_numpy("OUTPUT0")] == [v + b"|ok" for v in vals]
    finally:
        c.close()
