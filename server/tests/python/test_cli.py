"""Command-line behaviour: the embedded demo model, --model NAME=PATH, and
per-server flags overriding defaults."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import ferrite_testlib as fl

dm = fl.make_demo_model
tm = fl.make_test_models
DEMO_ASSET = fl.REPO_ROOT / "server" / "assets" / "demo.onnx"


def test_demo_asset_matches_generator(tmp_path):
    assert DEMO_ASSET.exists(), f"{DEMO_ASSET} missing: run scripts/make_demo_model.py"
    out = tmp_path / "demo.onnx"
    assert dm.main([str(out)]) == 0
    assert out.read_bytes() == DEMO_ASSET.read_bytes(), "server/assets/demo.onnx differs from scripts/make_demo_model.py output"
    assert DEMO_ASSET.stat().st_size < 16 * 1024


def test_no_model_flags_serves_demo(server_factory):
    s = server_factory([])
    c = s.grpc_client()
    try:
        idx = c.get_model_repository_index()
        assert "demo" in {m.name for m in idx.models}
        md = c.get_model_metadata("demo")
        assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("input", "FP32", [-1, 4])]
        assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("probabilities", "FP32", [-1, 3])]
        x = np.array([[0.1, 0.2, 0.3, 0.4], [-1.0, 2.0, 0.5, -0.5], [3.0, -2.0, 1.0, 0.0]], np.float32)
        inp = grpcclient.InferInput("input", [3, 4], "FP32").set_data_from_numpy(x)
        y = c.infer("demo", [inp]).as_numpy("probabilities")
        np.testing.assert_allclose(y, dm.demo_reference(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
    finally:
        c.close()
    h = s.http_client()
    try:
        x = np.ones((1, 4), np.float32)
        inp = httpclient.InferInput("input", [1, 4], "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        y = h.infer("demo", [inp], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
        np.testing.assert_allclose(y.as_numpy("probabilities"), dm.demo_reference(x), rtol=1e-5, atol=1e-6)
    finally:
        h.close()


def test_model_flag(server_factory, tmp_path):
    p1 = tmp_path / "one.onnx"
    p2 = tmp_path / "two.onnx"
    import onnx

    onnx.save(tm.make_add_sub(), str(p1))
    onnx.save(tm.make_mlp(), str(p2))
    s = server_factory(["--model", f"first={p1}", "--model", f"second={p2}"])
    c = s.grpc_client()
    try:
        names = {m.name for m in c.get_model_repository_index().models}
        assert {"first", "second"} <= names, names
        assert "demo" not in names, "demo must not be served when models are given"
        a = np.arange(16, dtype=np.float32).reshape(1, 16)
        ins = [grpcclient.InferInput(n, [1, 16], "FP32").set_data_from_numpy(a) for n in ("INPUT0", "INPUT1")]
        np.testing.assert_array_equal(c.infer("first", ins).as_numpy("OUTPUT0"), a * 2)
        x = np.random.default_rng(5).standard_normal((2, tm.MLP_IN)).astype(np.float32)
        y = c.infer("second", [grpcclient.InferInput("INPUT0", [2, tm.MLP_IN], "FP32").set_data_from_numpy(x)])
        np.testing.assert_allclose(y.as_numpy("OUTPUT0"), tm.mlp_reference(x), rtol=1e-5, atol=1e-5)
    finally:
        c.close()


def test_max_batch_size_flag(server_factory, tmp_path):
    p = tmp_path / "m.onnx"
    import onnx

    onnx.save(tm.make_mlp(), str(p))
    s = server_factory(["--model", f"m={p}", "--max-batch-size", "4", "--max-queue-delay-us", "1000"])
    c = s.grpc_client()
    try:
        cfg = c.get_model_config("m").config
        assert cfg.max_batch_size == 4
        assert [list(i.dims) for i in cfg.input] == [[tm.MLP_IN]]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 1000
    finally:
        c.close()
    s2 = server_factory(["--model", f"m={p}", "--max-batch-size", "1"])
    c = s2.grpc_client()
    try:
        cfg = c.get_model_config("m").config
        assert cfg.max_batch_size == 0
        assert [list(i.dims) for i in cfg.input] == [[-1, tm.MLP_IN]]
        assert not cfg.HasField("dynamic_batching")
        x = np.ones((5, tm.MLP_IN), np.float32)
        y = c.infer("m", [grpcclient.InferInput("INPUT0", [5, tm.MLP_IN], "FP32").set_data_from_numpy(x)])
        np.testing.assert_allclose(y.as_numpy("OUTPUT0"), tm.mlp_reference(x), rtol=1e-5, atol=1e-5)
    finally:
        c.close()
