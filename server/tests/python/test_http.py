"""KServe v2 REST + Triton extensions through tritonclient.http and raw HTTP."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient

import ferrite_testlib as fl
from conftest import RELOADABLE_MODEL

tm = fl.make_test_models


def _add_sub_inputs(a, b, binary=True):
    i0 = httpclient.InferInput("INPUT0", list(a.shape), "FP32")
    i0.set_data_from_numpy(a, binary_data=binary)
    i1 = httpclient.InferInput("INPUT1", list(b.shape), "FP32")
    i1.set_data_from_numpy(b, binary_data=binary)
    return [i0, i1]


def test_health_and_server_metadata(server, http_client):
    assert http_client.is_server_live() is True
    assert server.http_get("/v2/health/live")[0] == 200
    assert server.http_get("/v2/health/ready") == (200, server.http_get("/v2/health/ready")[1])
    assert http_client.is_server_ready() is True
    md = http_client.get_server_metadata()
    assert md["name"] == "ferrite"
    assert md.get("version")
    status, body = server.http_get("/v2")
    assert status == 200 and json.loads(body)["name"] == "ferrite"


def test_model_ready_http(server, http_client):
    assert http_client.is_model_ready("add_sub") is True
    assert http_client.is_model_ready("calc", "1") is True
    assert http_client.is_model_ready("no_such_model") is False
    assert server.http_get("/v2/models/add_sub/ready")[0] == 200
    assert server.http_get("/v2/models/calc/versions/3/ready")[0] == 200
    # Unknown model or version: 404 (KServe v2 says 4xx; unknown is NOT_FOUND everywhere).
    assert server.http_get("/v2/models/no_such_model/ready")[0] == 404
    assert server.http_get("/v2/models/calc/versions/2/ready")[0] == 404


def test_model_metadata_http(server, http_client):
    md = http_client.get_model_metadata("add_sub")
    assert md["name"] == "add_sub"
    assert md["versions"] == ["1"]
    assert md["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["inputs"]] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    assert [t["name"] for t in md["outputs"]] == ["OUTPUT0", "OUTPUT1"]
    md = http_client.get_model_metadata("calc", "1")
    assert md["name"] == "calc" and sorted(md["versions"], key=int) == ["1", "3"]
    fl.assert_json_error(server.http_get("/v2/models/no_such_model"), 404, "no_such_model")
    fl.assert_json_error(server.http_get("/v2/models/calc/versions/2"), 404, "calc")


def test_model_config_http(server, http_client):
    cfg = http_client.get_model_config("mlp")
    assert cfg["name"] == "mlp"
    assert cfg["platform"] == "onnxruntime_onnx"
    assert cfg["backend"] == "onnxruntime"
    assert cfg["max_batch_size"] == tm.MLP_CONFIG["max_batch_size"]
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in cfg["input"]] == [
        ("INPUT0", "TYPE_FP32", [tm.MLP_IN])
    ]
    assert "dynamic_batching" in cfg
    cfg = http_client.get_model_config("fixed")
    assert cfg.get("max_batch_size", 0) == 0
    assert [[int(d) for d in i["dims"]] for i in cfg["input"]] == [[2, 3]]
    assert "dynamic_batching" not in cfg
    fl.assert_json_error(server.http_get("/v2/models/no_such_model/config"), 404, "no_such_model")


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary_in", "json_in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary_out", "json_out"])
def test_infer_http(http_client, binary_in, binary_out):
    a = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    b = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("OUTPUT0", "OUTPUT1")]
    r = http_client.infer("add_sub", _add_sub_inputs(a, b, binary_in), outputs=outs, request_id="h1")
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    resp = r.get_response()
    assert resp["model_name"] == "add_sub"
    assert resp["model_version"] == "1"
    assert resp["id"] == "h1"
    for o in resp["outputs"]:
        assert o["datatype"] == "FP32" and o["shape"] == [2, 16]
        has_bin = "binary_data_size" in (o.get("parameters") or {})
        assert has_bin == binary_out, o
        if not binary_out:
            assert len(o["data"]) == 32


def test_infer_http_default_binary_output(http_client):
    # no outputs listed -> tritonclient sets binary_data_output=true
    a = np.ones((1, 16), np.float32)
    r = http_client.infer("add_sub", _add_sub_inputs(a, a))
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a * 2)
    for o in r.get_response()["outputs"]:
        assert o["parameters"]["binary_data_size"] == 64


@pytest.mark.parametrize("wanted", [["OUTPUT0"], ["OUTPUT1"]])
def test_requested_output_subset_http(http_client, wanted):
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 5.0, np.float32)
    r = http_client.infer("add_sub", _add_sub_inputs(a, b), outputs=[httpclient.InferRequestedOutput(n) for n in wanted])
    assert [o["name"] for o in r.get_response()["outputs"]] == wanted
    ref = tm.add_sub_reference(a, b)
    for n in ("OUTPUT0", "OUTPUT1"):
        if n in wanted:
            np.testing.assert_array_equal(r.as_numpy(n), ref[n])
        else:
            assert r.as_numpy(n) is None


@pytest.mark.parametrize("version,expect_version", [("", 3), ("1", 1), ("3", 3)])
def test_model_versions_http(http_client, version, expect_version):
    a = np.arange(16, dtype=np.float32).reshape(1, 16) - 4
    b = np.full((1, 16), 3.0, np.float32)
    r = http_client.infer("calc", _add_sub_inputs(a, b), model_version=version)
    ref = tm.calc_reference(expect_version, a, b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), ref["OUTPUT0"])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), ref["OUTPUT1"])
    assert r.get_response()["model_version"] == str(expect_version)


def test_model_version_not_found_http(http_client):
    a = np.ones((1, 16), np.float32)
    with fl.expect_http_error(404, "calc"):
        http_client.infer("calc", _add_sub_inputs(a, a), model_version="2")


def test_raw_json_infer(server):
    body = {
        "id": "raw-1",
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": list(range(16))},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [[1.0] * 16]},  # nested is allowed
        ],
        "outputs": [{"name": "OUTPUT0"}],
    }
    status, headers, raw = server.http_request(
        "POST", "/v2/models/add_sub/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, raw
    resp = json.loads(raw)
    assert resp["id"] == "raw-1"
    assert resp["model_name"] == "add_sub"
    assert len(resp["outputs"]) == 1
    out = resp["outputs"][0]
    assert out["name"] == "OUTPUT0" and out["datatype"] == "FP32" and out["shape"] == [1, 16]
    assert np.array(out["data"], np.float32).ravel().tolist() == [float(i + 1) for i in range(16)]


def test_raw_json_infer_versioned_path(server):
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [5.0] * 16},
        ]
    }
    status, _, raw = server.http_request("POST", "/v2/models/calc/versions/1/infer", json.dumps(body).encode())
    assert status == 200, raw
    outs = {o["name"]: o["data"] for o in json.loads(raw)["outputs"]}
    assert outs["OUTPUT0"] == [7.0] * 16 and outs["OUTPUT1"] == [-3.0] * 16


def _binary_request(header: dict, blobs: list[bytes]) -> tuple[bytes, dict]:
    h = json.dumps(header).encode()
    return h + b"".join(blobs), {
        "Inference-Header-Content-Length": str(len(h)),
        "Content-Type": "application/octet-stream",
    }


def _split_binary_response(headers: dict, raw: bytes):
    hl = {k.lower(): v for k, v in headers.items()}
    assert "inference-header-content-length" in hl, f"binary response lacks Inference-Header-Content-Length: {headers}"
    n = int(hl["inference-header-content-length"])
    return json.loads(raw[:n]), raw[n:]


def test_raw_binary_infer(server):
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 0.5, np.float32)
    header = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}},
        ],
        "outputs": [{"name": "OUTPUT1", "parameters": {"binary_data": True}}, {"name": "OUTPUT0", "parameters": {"binary_data": False}}],
    }
    body, hdrs = _binary_request(header, [a.tobytes(), b.tobytes()])
    status, rh, raw = server.http_request("POST", "/v2/models/add_sub/infer", body, hdrs)
    assert status == 200, raw[:500]
    resp, tail = _split_binary_response(rh, raw)
    outs = {o["name"]: o for o in resp["outputs"]}
    assert outs["OUTPUT1"]["parameters"]["binary_data_size"] == 64
    assert len(tail) == 64
    np.testing.assert_array_equal(np.frombuffer(tail, np.float32).reshape(1, 16), a - b)
    assert np.array(outs["OUTPUT0"]["data"], np.float32).ravel().tolist() == (a + b).ravel().tolist()


def test_raw_binary_data_output_parameter(server):
    # JSON inputs + request-level binary_data_output -> every output binary
    body = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": [2.0] * 16},
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    status, rh, raw = server.http_request("POST", "/v2/models/add_sub/infer", body, {"Content-Type": "application/json"})
    assert status == 200, raw[:500]
    resp, tail = _split_binary_response(rh, raw)
    sizes = [o["parameters"]["binary_data_size"] for o in resp["outputs"]]
    assert sizes == [64, 64] and len(tail) == 128
    got = {o["name"]: None for o in resp["outputs"]}
    off = 0
    for o in resp["outputs"]:
        got[o["name"]] = np.frombuffer(tail[off : off + 64], np.float32)
        off += 64
        assert "data" not in o
    assert got["OUTPUT0"].tolist() == [3.0] * 16 and got["OUTPUT1"].tolist() == [-1.0] * 16


def test_raw_binary_bytes_tensor(server):
    vals = [b"alpha", b"", "ñandú".encode()]
    blob = b"".join(struct.pack("<I", len(v)) + v for v in vals)
    header = {
        "inputs": [{"name": "INPUT0", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}}, {"name": "OUTPUT1", "parameters": {"binary_data": False}}],
    }
    body, hdrs = _binary_request(header, [blob])
    status, rh, raw = server.http_request("POST", "/v2/models/strings/infer", body, hdrs)
    assert status == 200, raw[:500]
    hl = {k.lower(): v for k, v in rh.items()}
    resp = json.loads(raw[: int(hl["inference-header-content-length"])]) if "inference-header-content-length" in hl else json.loads(raw)
    outs = {o["name"]: o for o in resp["outputs"]}
    assert outs["OUTPUT0"]["data"] == ["alpha|ok", "|ok", "ñandú|ok"]
    assert outs["OUTPUT1"]["data"] == [False, True, False]


def _stats(http_client, name, version=""):
    st = http_client.get_inference_statistics(name, version)
    entries = [m for m in st["model_stats"] if m["name"] == name]
    assert entries, st
    return entries[0]


def test_statistics_http(server, http_client):
    before = _stats(http_client, "add_sub")
    a = np.ones((1, 16), np.float32)
    for _ in range(4):
        http_client.infer("add_sub", _add_sub_inputs(a, a))
    after = _stats(http_client, "add_sub")
    assert int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"]) == 4
    assert int(after["inference_count"]) - int(before["inference_count"]) == 4
    all_stats = http_client.get_inference_statistics()
    assert {"add_sub", "mlp", "calc"} <= {m["name"] for m in all_stats["model_stats"]}
    status, body = server.http_get("/v2/models/calc/versions/1/stats")
    assert status == 200 and all(m["version"] == "1" for m in json.loads(body)["model_stats"])
    fl.assert_json_error(server.http_get("/v2/models/no_such_model/stats"), 404, "no_such_model")


def test_repository_index_http(server, http_client):
    idx = http_client.get_model_repository_index()
    names = {m["name"] for m in idx}
    assert {"add_sub", "calc", "mlp", "strings", RELOADABLE_MODEL} <= names
    assert all(m.get("state") == "READY" for m in idx if m["name"] == "add_sub")
    status, _, raw = server.http_request("POST", "/v2/repository/index", b"{}", {"Content-Type": "application/json"})
    assert status == 200 and {m["name"] for m in json.loads(raw)} == names


def test_unload_then_load_http(server, http_client):
    m = RELOADABLE_MODEL
    a = np.ones((1, 16), np.float32)
    http_client.unload_model(m)
    try:
        assert http_client.is_model_ready(m) is False
        with fl.expect_http_error(404, m):
            http_client.infer(m, _add_sub_inputs(a, a))
        assert server.http_get(f"/v2/models/{m}/ready")[0] == 503  # known, not serving
    finally:
        http_client.load_model(m)
    assert http_client.is_model_ready(m) is True
    r = http_client.infer(m, _add_sub_inputs(a, a))
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a * 2)


def test_load_model_added_after_start_http(server, http_client, model_repo):
    name = "late_add_sub_http"
    shutil.copytree(model_repo / "add_sub", model_repo / name)
    try:
        status, _, raw = server.http_request("POST", f"/v2/repository/models/{name}/load", b"", {})
        assert status == 200, raw
        a = np.full((1, 16), 4.0, np.float32)
        r = http_client.infer(name, _add_sub_inputs(a, a))
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), np.zeros((1, 16), np.float32))
    finally:
        status, _, raw = server.http_request("POST", f"/v2/repository/models/{name}/unload", b"", {})
        shutil.rmtree(model_repo / name)
    assert status == 200, raw
    assert http_client.is_model_ready(name) is False


def test_load_unknown_model_http(server):
    status, _, raw = server.http_request("POST", "/v2/repository/models/definitely_not_in_repo/load", b"", {})
    assert status in (400, 404), raw
    fl.assert_json_error((status, raw), status, "definitely_not_in_repo")


def test_unknown_route_and_model(server):
    fl.assert_json_error(server.http_request("POST", "/v2/models/no_such_model/infer", b'{"inputs": []}'), 404, "no_such_model")
    status, _, _ = server.http_request("GET", "/v2/this/route/does/not/exist")
    assert status == 404


def test_inputs_in_any_order_http(http_client):
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 10.0, np.float32)
    ins = _add_sub_inputs(a, b)
    r = http_client.infer("add_sub", [ins[1], ins[0]])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)


def test_large_message_under_limit_http(http_client):
    from conftest import MAX_MESSAGE_BYTES

    x = np.array([b"z" * (MAX_MESSAGE_BYTES - 256 * 1024)], dtype=np.object_)
    inp = httpclient.InferInput("INPUT0", [1], "BYTES")
    inp.set_data_from_numpy(x)
    r = http_client.infer("strings", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert r.as_numpy("OUTPUT1").tolist() == [False]
