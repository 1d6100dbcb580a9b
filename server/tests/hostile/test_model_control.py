"""Attack: anyone who reaches the inference ports unloads the models.

Before issue 12 one body-less POST (a browser page could fire it) marked the
model NOT_SERVING, which the pod's probes turned into a restart. With the
default `--model-control-mode none` it is refused and nothing changes.
"""

from __future__ import annotations

import pytest

import ferrite_testlib as fl
from siege import Siege

MODEL = "add_sub"


def model_ready(server) -> bool:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return client.is_model_ready(MODEL) and client.is_server_live()
    finally:
        client.close()


def test_unload_over_http_is_refused(target):
    server = target.get()
    with Siege(server, "HTTP POST .../unload, no body, x50", rss_growth_bound_mib=32) as siege:
        statuses = {server.http_request("POST", f"/v2/repository/models/{MODEL}/unload")[0] for _ in range(50)}
        siege.outcome = "HTTP " + ",".join(map(str, sorted(statuses)))
    assert statuses == {403}, statuses
    assert model_ready(server)


def test_unload_and_load_over_grpc_are_refused(target):
    import tritonclient.grpc as grpcclient

    server = target.get()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    codes = set()
    with Siege(server, "gRPC RepositoryModelUnload/Load, x50", rss_growth_bound_mib=32) as siege:
        for i in range(50):
            call = client.unload_model if i % 2 == 0 else client.load_model
            with pytest.raises(Exception) as refused:
                call(MODEL)
            codes.add(fl.grpc_status(refused.value))
            assert "model-control-mode" in str(refused.value)
        siege.outcome = "gRPC " + ",".join(sorted(codes))
    client.close()
    assert codes == {"FAILED_PRECONDITION"}, codes
    assert model_ready(server)
