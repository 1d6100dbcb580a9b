"""Every GRPCInferenceService RPC through tritonclient.grpc."""

from __future__ import annotations

import queue
import shutil
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

import ferrite_testlib as fl
from conftest import RELOADABLE_MODEL

tm = fl.make_test_models


def test_server_live_ready_metadata(grpc_client):
    assert grpc_client.is_server_live() is True
    assert grpc_client.is_server_ready() is True
    md = grpc_client.get_server_metadata()
    assert md.name == "ferrite"
    assert md.version, "server metadata should carry a version"


def test_model_ready(grpc_client):
    assert grpc_client.is_model_ready("add_sub") is True
    assert grpc_client.is_model_ready("calc", "1") is True
    assert grpc_client.is_model_ready("calc", "3") is True
    # Unknown model/version: NOT_FOUND (a known model that does not serve is ready=false).
    for args in (("no_such_model",), ("calc", "2")):
        with fl.expect_grpc_error("NOT_FOUND"):
            grpc_client.is_model_ready(*args)


def test_model_metadata(grpc_client):
    md = grpc_client.get_model_metadata("add_sub")
    assert md.name == "add_sub"
    assert list(md.versions) == ["1"]
    assert md.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [
        ("INPUT0", "FP32", [-1, 16]),
        ("INPUT1", "FP32", [-1, 16]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [
        ("OUTPUT0", "FP32", [-1, 16]),
        ("OUTPUT1", "FP32", [-1, 16]),
    ]
    fixed = grpc_client.get_model_metadata("fixed")
    assert [list(t.shape) for t in fixed.inputs] == [[2, 3]]
    s = grpc_client.get_model_metadata("strings")
    assert [(t.name, t.datatype, list(t.shape)) for t in s.inputs] == [("INPUT0", "BYTES", [-1])]
    assert [(t.name, t.datatype) for t in s.outputs] == [("OUTPUT0", "BYTES"), ("OUTPUT1", "BOOL")]


def test_model_metadata_versions(grpc_client):
    md = grpc_client.get_model_metadata("calc")
    assert sorted(md.versions, key=int) == ["1", "3"]
    assert grpc_client.get_model_metadata("calc", "1").name == "calc"
    with fl.expect_grpc_error("NOT_FOUND", "calc"):
        grpc_client.get_model_metadata("calc", "2")
    with fl.expect_grpc_error("NOT_FOUND", "no_such_model"):
        grpc_client.get_model_metadata("no_such_model")


def _dims(t):
    return [int(d) for d in t.dims]


def test_model_config_batching(grpc_client):
    cfg = grpc_client.get_model_config("mlp").config
    assert cfg.name == "mlp"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == tm.MLP_CONFIG["max_batch_size"]
    assert [(i.name, grpcclient.model_config_pb2.DataType.Name(i.data_type), _dims(i)) for i in cfg.input] == [
        ("INPUT0", "TYPE_FP32", [tm.MLP_IN])
    ]
    assert [(o.name, _dims(o)) for o in cfg.output] == [("OUTPUT0", [tm.MLP_OUT])]
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == tm.MLP_CONFIG["max_queue_delay_microseconds"]


def test_model_config_not_batching(grpc_client):
    # ferrite.json max_batch_size 1 -> batching off -> full shapes
    cfg = grpc_client.get_model_config("slow").config
    assert cfg.max_batch_size == 0
    assert [_dims(i) for i in cfg.input] == [[1, tm.SLOW_WIDTH]]
    assert not cfg.HasField("dynamic_batching")
    # fixed shape: no dynamic first dim -> never batched
    cfg = grpc_client.get_model_config("fixed").config
    assert cfg.max_batch_size == 0
    assert [_dims(i) for i in cfg.input] == [[2, 3]]
    assert not cfg.HasField("dynamic_batching")


def test_model_config_default_flags_consistent(grpc_client):
    # add_sub has no ferrite.json: whatever the default batch size, dims must agree with it.
    cfg = grpc_client.get_model_config("add_sub").config
    if cfg.max_batch_size > 1:
        assert [_dims(i) for i in cfg.input] == [[16], [16]]
        assert cfg.HasField("dynamic_batching")
    else:
        assert cfg.max_batch_size == 0
        assert [_dims(i) for i in cfg.input] == [[-1, 16], [-1, 16]]
        assert not cfg.HasField("dynamic_batching")
    with fl.expect_grpc_error("NOT_FOUND", "no_such_model"):
        grpc_client.get_model_config("no_such_model")


def test_infer_add_sub(grpc_client):
    a = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    res, _, _ = fl.grpc_infer_add_sub(grpc_client, a, b, request_id="req-42")
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
    resp = res.get_response()
    assert resp.model_name == "add_sub"
    assert resp.model_version == "1"
    assert resp.id == "req-42"
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("OUTPUT0", "FP32", [3, 16]),
        ("OUTPUT1", "FP32", [3, 16]),
    ]


@pytest.mark.parametrize("wanted", [["OUTPUT0"], ["OUTPUT1"], ["OUTPUT1", "OUTPUT0"]])
def test_requested_output_subset(grpc_client, wanted):
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 5.0, np.float32)
    outs = [grpcclient.InferRequestedOutput(n) for n in wanted]
    res, _, _ = fl.grpc_infer_add_sub(grpc_client, a, b, outputs=outs)
    names = [o.name for o in res.get_response().outputs]
    assert sorted(names) == sorted(wanted)
    ref = tm.add_sub_reference(a, b)
    for n in ("OUTPUT0", "OUTPUT1"):
        if n in wanted:
            np.testing.assert_array_equal(res.as_numpy(n), ref[n])
        else:
            assert res.as_numpy(n) is None


def test_requested_unknown_output(grpc_client):
    with fl.expect_grpc_error("INVALID_ARGUMENT", "OUTPUT9"):
        fl.grpc_infer_add_sub(grpc_client, outputs=[grpcclient.InferRequestedOutput("OUTPUT9")])
    fl.grpc_infer_add_sub(grpc_client)


def _calc(client, version=""):
    a = np.array([[1, 2, 3, 4, 5, 6, 7, 8, -1, -2, -3, -4, 0.5, 1.5, 2.5, 3.5]], np.float32)
    b = np.full((1, 16), 3.0, np.float32)
    i0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(a)
    i1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32").set_data_from_numpy(b)
    res = client.infer("calc", [i0, i1], model_version=version)
    return res, a, b


@pytest.mark.parametrize("version,expect_version", [("", 3), ("1", 1), ("3", 3)])
def test_model_versions(grpc_client, version, expect_version):
    res, a, b = _calc(grpc_client, version)
    ref = tm.calc_reference(expect_version, a, b)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), ref["OUTPUT0"])
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), ref["OUTPUT1"])
    assert res.get_response().model_version == str(expect_version)


def test_model_version_not_found(grpc_client):
    with fl.expect_grpc_error("NOT_FOUND", "calc"):
        _calc(grpc_client, "2")
    with fl.expect_grpc_error("NOT_FOUND"):
        _calc(grpc_client, "99")


def test_custom_parameters_accepted(grpc_client):
    res, a, b = fl.grpc_infer_add_sub(grpc_client, parameters={"my_flag": True, "my_int": 7, "my_str": "x"})
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
    res, a, b = fl.grpc_infer_add_sub(grpc_client, priority=2, timeout=10_000_000)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)


def test_streaming(server):
    client = server.grpc_client()
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    sent = {}
    try:
        for i in range(12):
            a = np.full((1, 16), float(i), np.float32)
            b = np.arange(16, dtype=np.float32).reshape(1, 16) * (i + 1)
            i0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(a)
            i1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32").set_data_from_numpy(b)
            model = "add_sub" if i % 2 == 0 else "calc"
            client.async_stream_infer(model, [i0, i1], request_id=f"s{i}")
            sent[f"s{i}"] = (model, a, b)
        # an unknown model in the middle of the stream: an error response, stream keeps going
        i0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(np.zeros((1, 16), np.float32))
        client.async_stream_infer("no_such_model", [i0], request_id="bad")
        a = np.ones((1, 16), np.float32)
        i0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(a)
        i1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32").set_data_from_numpy(a)
        client.async_stream_infer("add_sub", [i0, i1], request_id="after-bad")
        sent["after-bad"] = ("add_sub", a, a)

        got, errors = {}, []
        deadline = time.monotonic() + 60
        while len(got) + len(errors) < len(sent) + 1 and time.monotonic() < deadline:
            result, error = results.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result
    finally:
        client.stop_stream()
        client.close()
    assert sorted(got) == sorted(sent), f"stream responses for ids {sorted(got)}, expected {sorted(sent)}"
    for rid, (model, a, b) in sent.items():
        ref = tm.add_sub_reference(a, b) if model == "add_sub" else tm.calc_reference(3, a, b)
        r = got[rid]
        assert r.get_response().model_name == model
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), ref["OUTPUT0"], err_msg=rid)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), ref["OUTPUT1"], err_msg=rid)
    assert len(errors) == 1, errors
    assert "no_such_model" in (errors[0].message() or str(errors[0]))


def _model_stats(client, name, version=""):
    st = client.get_inference_statistics(name, version)
    entries = [m for m in st.model_stats if m.name == name]
    assert entries, f"no statistics for {name}: {st}"
    return entries


def test_statistics_count_up(grpc_client):
    before = _model_stats(grpc_client, "add_sub")[0]
    for _ in range(3):
        fl.grpc_infer_add_sub(grpc_client)
    after = _model_stats(grpc_client, "add_sub")[0]
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count >= 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.last_inference >= before.last_inference
    assert after.last_inference > 0
    for part in ("queue", "compute_infer"):
        b, a = getattr(before.inference_stats, part), getattr(after.inference_stats, part)
        assert a.count - b.count >= 1, f"inference_stats.{part}.count did not grow"
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns


def test_statistics_compute_input_output(grpc_client):
    """Triton also reports compute_input / compute_output (tensor copy-in/out
    around the run); perf_analyzer shows them. Kept separate from the basic count test."""
    before = _model_stats(grpc_client, "add_sub")[0]
    fl.grpc_infer_add_sub(grpc_client)
    after = _model_stats(grpc_client, "add_sub")[0]
    for part in ("compute_input", "compute_output"):
        b, a = getattr(before.inference_stats, part), getattr(after.inference_stats, part)
        assert a.count - b.count == 1, f"inference_stats.{part}.count went {b.count} -> {a.count}"


def test_statistics_all_models_and_versions(grpc_client):
    st = grpc_client.get_inference_statistics()
    names = {m.name for m in st.model_stats}
    assert {"add_sub", "calc", "mlp", "slow", "strings"} <= names
    _calc(grpc_client, "1")
    v1 = _model_stats(grpc_client, "calc", "1")
    assert all(m.version == "1" for m in v1)
    assert v1[0].inference_stats.success.count >= 1
    with fl.expect_grpc_error("NOT_FOUND", "no_such_model"):
        grpc_client.get_inference_statistics("no_such_model")


def test_repository_index(grpc_client):
    idx = grpc_client.get_model_repository_index()
    entries = {(m.name, m.version): m.state for m in idx.models}
    names = {m.name for m in idx.models}
    expected = {"add_sub", "calc", "mlp", "slow", "slow_q64", "strings", "fixed", RELOADABLE_MODEL}
    expected |= {tm.identity_model_name(d) for d in tm.DATATYPES}
    assert expected <= names, f"missing from index: {expected - names}"
    for (name, version), state in entries.items():
        if name in ("add_sub", "calc", "mlp"):
            assert state == "READY", (name, version, state)


def test_unload_then_load(grpc_client):
    m = RELOADABLE_MODEL
    a = np.ones((1, 16), np.float32)

    def infer():
        i0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(a)
        i1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32").set_data_from_numpy(a * 2)
        return grpc_client.infer(m, [i0, i1])

    np.testing.assert_array_equal(infer().as_numpy("OUTPUT0"), a * 3)
    grpc_client.unload_model(m)
    assert grpc_client.is_model_ready(m) is False  # known, not serving
    with fl.expect_grpc_error("NOT_FOUND", m):
        infer()
    idx = {x.name: x.state for x in grpc_client.get_model_repository_index().models}
    assert idx.get(m) != "READY", f"unloaded model still READY in index: {idx.get(m)}"
    grpc_client.load_model(m)
    assert grpc_client.is_model_ready(m) is True
    np.testing.assert_array_equal(infer().as_numpy("OUTPUT0"), a * 3)
    idx = {x.name: x.state for x in grpc_client.get_model_repository_index().models}
    assert idx.get(m) == "READY"


def test_load_model_added_after_start(grpc_client, model_repo):
    name = "late_calc_grpc"
    shutil.copytree(model_repo / "calc", model_repo / name)
    try:
        grpc_client.load_model(name)
        assert grpc_client.is_model_ready(name) is True
        md = grpc_client.get_model_metadata(name)
        assert sorted(md.versions, key=int) == ["1", "3"]
        a = np.full((1, 16), 2.0, np.float32)
        i0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(a)
        i1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32").set_data_from_numpy(a)
        res = grpc_client.infer(name, [i0, i1], model_version="1")
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + a)
    finally:
        try:
            grpc_client.unload_model(name)
        finally:
            shutil.rmtree(model_repo / name)


def test_load_unknown_model_fails(grpc_client):
    with pytest.raises(InferenceServerException) as ei:
        grpc_client.load_model("definitely_not_in_repo")
    assert fl.grpc_status(ei.value) in ("NOT_FOUND", "INVALID_ARGUMENT"), ei.value
    assert "definitely_not_in_repo" in ei.value.message()
    # a name that is not in the repository must not take the server out of readiness
    assert grpc_client.is_server_ready() is True
    fl.grpc_infer_add_sub(grpc_client)


def test_inputs_in_any_order(grpc_client):
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 10.0, np.float32)
    i1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32").set_data_from_numpy(b)
    i0 = grpcclient.InferInput("INPUT0", [1, 16], "FP32").set_data_from_numpy(a)
    res = grpc_client.infer("add_sub", [i1, i0])
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)


def test_load_already_loaded_model(grpc_client):
    grpc_client.load_model(RELOADABLE_MODEL)
    assert grpc_client.is_model_ready(RELOADABLE_MODEL) is True
    a = np.ones((1, 16), np.float32)
    ins = [grpcclient.InferInput(n, [1, 16], "FP32").set_data_from_numpy(a) for n in ("INPUT0", "INPUT1")]
    np.testing.assert_array_equal(grpc_client.infer(RELOADABLE_MODEL, ins).as_numpy("OUTPUT0"), a * 2)


def test_large_message_under_limit(grpc_client):
    from conftest import MAX_MESSAGE_BYTES

    big = b"y" * (MAX_MESSAGE_BYTES - 256 * 1024)
    x = np.array([big], dtype=np.object_)
    res = grpc_client.infer("strings", [grpcclient.InferInput("INPUT0", [1], "BYTES").set_data_from_numpy(x)],
                            outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    assert res.as_numpy("OUTPUT1").tolist() == [False]
