"""grpc.health.v1.Health (server and per-model) and gRPC server reflection
(v1alpha through grpcio-reflection's descriptor database, v1 by hand: same
messages, different service name)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import RELOADABLE_MODEL

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def channel(server):
    ch = grpc.insecure_channel(server.grpc_url)
    yield ch
    ch.close()


def _check(channel, service):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_server(channel):
    assert _check(channel, "") == SERVING


@pytest.mark.parametrize("model", ["add_sub", "mlp", "calc", "identity_bytes"])
def test_health_model(channel, model):
    assert _check(channel, model) == SERVING


def test_health_unknown_service(channel):
    with pytest.raises(grpc.RpcError) as ei:
        _check(channel, "no_such_model")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND, ei.value


def test_health_follows_unload_and_load(channel, grpc_client):
    assert _check(channel, RELOADABLE_MODEL) == SERVING
    grpc_client.unload_model(RELOADABLE_MODEL)
    try:
        try:
            status = _check(channel, RELOADABLE_MODEL)
            assert status == NOT_SERVING, f"unloaded model reports {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        except grpc.RpcError as e:  # an unloaded model may also be unknown to health
            assert e.code() == grpc.StatusCode.NOT_FOUND, e
        assert _check(channel, "") == SERVING  # the server as a whole is still serving
    finally:
        grpc_client.load_model(RELOADABLE_MODEL)
    assert _check(channel, RELOADABLE_MODEL) == SERVING


def test_health_watch(channel):
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    first = next(iter(stream))
    assert first.status == SERVING
    stream.cancel()
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="add_sub"), timeout=5)
    assert next(iter(stream)).status == SERVING
    stream.cancel()


def test_reflection_v1alpha_lists_services(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert "inference.GRPCInferenceService" in services, services
    assert "grpc.health.v1.Health" in services, services
    fdp = db.FindFileContainingSymbol("inference.GRPCInferenceService")
    svc = [s for s in fdp.service if s.name == "GRPCInferenceService"]
    assert svc, fdp.name
    methods = {m.name for m in svc[0].method}
    expected = {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
        "RepositoryModelUnload",
    }  # fmt: skip
    assert expected <= methods, expected - methods


def test_reflection_resolves_message_types(channel):
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    req = pool.FindMessageTypeByName("inference.ModelInferRequest")
    assert {"model_name", "inputs", "raw_input_contents", "parameters"} <= {f.name for f in req.fields}


def test_reflection_v1_lists_services(channel):
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    reqs = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ]
    responses = list(call(iter(reqs), timeout=10))
    assert len(responses) == 2
    names = {s.name for s in responses[0].list_services_response.service}
    assert "inference.GRPCInferenceService" in names, names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in responses[1].file_descriptor_response.file_descriptor_proto]
    assert any(any(s.name == "GRPCInferenceService" for s in f.service) for f in files)


def test_health_watch_sees_unload_and_load(channel, grpc_client):
    import queue
    import threading

    got: queue.Queue = queue.Queue()
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=RELOADABLE_MODEL), timeout=30)

    def pump():
        try:
            for msg in stream:
                got.put(msg.status)
        except grpc.RpcError:
            got.put(None)

    threading.Thread(target=pump, daemon=True).start()
    assert got.get(timeout=10) == SERVING
    grpc_client.unload_model(RELOADABLE_MODEL)
    try:
        st = got.get(timeout=10)
        assert st in (NOT_SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN), st
    finally:
        grpc_client.load_model(RELOADABLE_MODEL)
    assert got.get(timeout=10) == SERVING
    stream.cancel()
