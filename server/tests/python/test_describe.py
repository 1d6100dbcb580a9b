"""One description of each model: REST and gRPC must say the same, field
by field (metadata, configuration, statistics), for every model of the
test repository. The LLM's case is in test_llm.py (it needs its server)."""

import ferrite_testlib as fl


def test_rest_and_grpc_describe_every_model_alike(server):
    models, differences = fl.description_differences(server)
    assert len(models) >= 5, f"expected the test repository's models, got {models}"
    assert not differences, "\n".join(differences)
