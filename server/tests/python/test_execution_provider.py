"""Execution providers say what they are (docs/gpu.md).

These run against the CPU build of ONNX Runtime that the tests use: it has no
CUDA provider, which is a real "the provider cannot start" (the same path as a
node without a GPU or without its driver). A model that asks for CUDA must
then fail its load with a message that says so, unless the CPU fallback is
allowed: then it loads on the CPU and every report names `cpu`.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import tritonclient.grpc as grpcclient

import ferrite_testlib as fl

tm = fl.make_test_models

# ferrite_contract::exit::MODEL_LOAD_FAILED
MODEL_LOAD_FAILED = 3


def _model(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(tm.make_mlp(), str(path))
    return path


def _run_to_exit(args, timeout=60):
    cmd = [str(fl.server_binary()), "serve", "--host", "127.0.0.1",
           *sum((["--" + p, str(port)] for p, port in zip(("http-port", "grpc-port", "metrics-port"), fl.free_ports(3))), []),
           *args]  # fmt: skip
    env = {"ORT_DYLIB_PATH": fl.ort_dylib(), "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_cuda_without_a_gpu_fails_the_load_with_a_clear_message(tmp_path):
    for provider in ("cuda", "tensorrt"):
        done = _run_to_exit(["--model", f"m={_model(tmp_path)}", "--execution-provider", provider, "--exit-on-load-failure"])
        assert done.returncode == MODEL_LOAD_FAILED, (done.returncode, done.stderr[-3000:])
        last = done.stderr.strip().splitlines()[-1]
        # The termination message the operator shows: what, why, and the way out.
        assert f"execution provider '{provider}' cannot start" in last, last
        assert "allow-cpu-fallback" in last and "allowCpuFallback" in last, last
        assert "ferrite-server-cuda" in last, last


def test_cuda_without_a_gpu_keeps_the_server_up_but_not_ready(server_factory, tmp_path):
    s = server_factory(["--model", f"m={_model(tmp_path)}", "--execution-provider", "cuda"], start=False)
    s.start(wait=False)
    fl.wait_until(lambda: "cannot start" in s.log_tail(20000), what="the load failure in the log")
    assert s.alive()
    status, _ = s.http_get("/v2/models/m/ready")
    assert status != 200


def test_fallback_allowed_runs_on_the_cpu_and_says_so(server_factory, tmp_path):
    s = server_factory(["--model", f"m={_model(tmp_path)}", "--execution-provider", "cuda", "--allow-cpu-fallback"])
    c = s.grpc_client()
    try:
        x = np.random.default_rng(3).standard_normal((2, tm.MLP_IN)).astype(np.float32)
        y = c.infer("m", [grpcclient.InferInput("INPUT0", [2, tm.MLP_IN], "FP32").set_data_from_numpy(x)])
        np.testing.assert_allclose(y.as_numpy("OUTPUT0"), tm.mlp_reference(x), rtol=1e-5, atol=1e-5)
        config = c.get_model_config("m").config
        assert config.parameters["execution_provider"].string_value == "cpu"
        assert [g.kind for g in config.instance_group] == [grpcclient.model_config_pb2.ModelInstanceGroup.KIND_CPU]
    finally:
        c.close()
    samples = fl.parse_metrics(s.metrics_text())
    info = fl.metric_find(samples, "ferrite_model_info", model="m")
    assert [(labels["provider"], value) for labels, value in info] == [("cpu", 1.0)], info
    log = s.log_tail(20000)
    assert "execution provider fallback" in log and "cannot start" in log
    assert 'execution_provider="cpu"' in log or "execution_provider=cpu" in log or '"execution_provider":"cpu"' in log, log[-2000:]


def test_cpu_reports_cpu(server_factory, tmp_path):
    s = server_factory(["--model", f"m={_model(tmp_path)}"])
    c = s.grpc_client()
    try:
        assert c.get_model_config("m").config.parameters["execution_provider"].string_value == "cpu"
    finally:
        c.close()
    info = fl.metric_find(fl.parse_metrics(s.metrics_text()), "ferrite_model_info", model="m")
    assert [labels["provider"] for labels, _ in info] == ["cpu"], info
