"""Model control and health as probes see them:

* `--model-control-mode none` (the default) refuses load and unload on gRPC
  (FAILED_PRECONDITION) and HTTP (403) with a message naming the flag; the
  repository index stays readable and the models keep serving.
* `explicit`: N concurrent load calls of one model (gRPC and HTTP mixed)
  build one copy of it.
* Liveness vs readiness: the gRPC health service "" stays SERVING when a
  model failed to load (a restart would not help), the model's own service
  and /v2/health/ready say not ready; the metrics port serves the liveness
  and per-model readiness paths in plain HTTP for probes.
* An unknown model's readiness is NOT_FOUND (HTTP 404, gRPC NOT_FOUND); a
  known model that does not serve is only not ready (503 / ready=false).
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

import ferrite_testlib as fl

tm = fl.make_test_models
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A model whose load takes long enough (a 64 MiB weight) for concurrent
# load calls to overlap it.
HEAVY = "heavy"
HEAVY_WIDTH = 4096


def _make_heavy():
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", HEAVY_WIDTH])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", HEAVY_WIDTH])
    w = np.random.default_rng(0).standard_normal((HEAVY_WIDTH, HEAVY_WIDTH), dtype=np.float32) * 0.01
    weight = helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["INPUT0", "W"], ["OUTPUT0"])], HEAVY, [x], [y], [weight])
    return tm._model(graph)


@pytest.fixture(scope="module")
def control_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("control_repo")
    tm._save(repo, "add_sub", tm.make_add_sub())
    tm._save(repo, HEAVY, _make_heavy())
    return repo


def _health(server, service):
    with grpc.insecure_channel(server.grpc_url) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _metrics_port_get(server, path):
    url = f"http://127.0.0.1:{server.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except urllib.error.URLError:  # not listening yet
        return 0


def _load_count(server, model) -> float:
    samples = fl.parse_metrics(server.metrics_text())
    return fl.metric_sum(samples, "ferrite_model_load_duration_seconds_count", model=model)


def test_load_and_unload_are_refused_by_default(server_factory, control_repo):
    s = server_factory(["--model-repository", str(control_repo)])
    c = s.grpc_client()
    try:
        for call in (c.load_model, c.unload_model):
            with fl.expect_grpc_error("FAILED_PRECONDITION", "--model-control-mode explicit", "add_sub"):
                call("add_sub")
        # Refused before anything is looked up: an unknown model gets the same answer.
        with fl.expect_grpc_error("FAILED_PRECONDITION", "--model-control-mode explicit"):
            c.unload_model("no_such_model")
        for action in ("load", "unload"):
            status, body = s.http_request("POST", f"/v2/repository/models/add_sub/{action}", b"", {})[::2]
            fl.assert_json_error((status, body), 403, "--model-control-mode explicit")
        # The index stays readable, the model keeps serving and stays healthy.
        index = {m.name: m.state for m in c.get_model_repository_index().models}
        assert index == {"add_sub": "READY", HEAVY: "READY"}, index
        status, _, body = s.http_request("POST", "/v2/repository/index", b"{}", {})
        assert status == 200 and b"add_sub" in body
        assert c.is_model_ready("add_sub")
        fl.grpc_infer_add_sub(c)
        assert _health(s, "add_sub") == SERVING
    finally:
        c.close()


def test_concurrent_loads_build_one_copy(server_factory, control_repo):
    s = server_factory(["--model-repository", str(control_repo), "--model-control-mode", "explicit"])
    c = s.grpc_client()
    c.unload_model(HEAVY)
    c.close()
    before = _load_count(s, HEAVY)
    n = 8
    barrier = threading.Barrier(n)
    errors = []

    def call(i):
        try:
            barrier.wait(timeout=30)
            if i % 2:
                client = s.grpc_client()
                client.load_model(HEAVY)
                client.close()
            else:
                status, _, body = s.http_request("POST", f"/v2/repository/models/{HEAVY}/load", b"", {})
                assert status == 200, (status, body)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    builds = _load_count(s, HEAVY) - before
    assert builds == 1, f"{n} concurrent load calls built {builds:.0f} copies of the model"
    c = s.grpc_client()
    try:
        assert c.is_model_ready(HEAVY)
        x = np.ones((1, HEAVY_WIDTH), np.float32)
        res = c.infer(HEAVY, [grpcclient.InferInput("INPUT0", list(x.shape), "FP32").set_data_from_numpy(x)])
        assert res.as_numpy("OUTPUT0").shape == (1, HEAVY_WIDTH)
    finally:
        c.close()


def test_failed_model_keeps_liveness_and_probes_on_metrics_port(server_factory, control_repo, tmp_path):
    repo = tmp_path / "repo"
    tm._save(repo, "add_sub", tm.make_add_sub())
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    s = server_factory(["--model-repository", str(repo)], start=False)
    s.start(wait=False)
    fl.wait_until(lambda: _metrics_port_get(s, "/v2/models/add_sub/ready") == 200, what="add_sub to be ready")
    fl.wait_until(
        lambda: "broken" in s.log_tail() and s.http_get("/v2/health/ready")[0] == 503,
        what="the startup load to finish",
    )
    # Liveness: the process serves.
    assert _health(s, "") == SERVING
    assert _metrics_port_get(s, "/v2/health/live") == 200
    # Readiness: per model, and the server as a whole.
    assert _health(s, "add_sub") == SERVING
    assert _health(s, "broken") == NOT_SERVING
    assert _metrics_port_get(s, "/v2/models/add_sub/ready") == 200
    assert _metrics_port_get(s, "/v2/models/broken/ready") == 503
    assert _metrics_port_get(s, "/v2/models/no_such_model/ready") == 404
    assert s.http_get("/v2/models/broken/ready")[0] == 503
    assert s.http_get("/v2/models/no_such_model/ready")[0] == 404
    # The metrics port serves nothing else of the API.
    assert _metrics_port_get(s, "/v2/models/add_sub") == 404
    with grpc.insecure_channel(s.grpc_url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ModelReady(service_pb2.ModelReadyRequest(name="add_sub"), timeout=10).ready
        assert not stub.ModelReady(service_pb2.ModelReadyRequest(name="broken"), timeout=10).ready
        assert not stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelReady(service_pb2.ModelReadyRequest(name="no_such_model"), timeout=10)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "no_such_model" in ei.value.details(), ei.value
