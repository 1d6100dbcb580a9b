"""Prometheus /metrics on --metrics-port."""

from __future__ import annotations

import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import ferrite_testlib as fl

HISTOGRAMS = [
    "ferrite_queue_duration_seconds",
    "ferrite_compute_duration_seconds",
    "ferrite_request_duration_seconds",
    "ferrite_batch_size",
]


def _samples(server):
    return fl.parse_metrics(server.metrics_text())


def test_metrics_endpoint_format(server):
    with urllib.request.urlopen(server.metrics_url, timeout=30) as r:
        assert r.status == 200
        ctype = r.headers.get("Content-Type", "")
        body = r.read().decode()
    assert ctype.startswith("text/plain"), ctype
    names = {n for n, _, _ in fl.parse_metrics(body)}
    assert names, "no samples on /metrics"
    assert all(n.startswith("ferrite_") or n.startswith("process_") for n in names), sorted(
        n for n in names if not n.startswith("ferrite_")
    )
    assert "# TYPE ferrite_requests_total counter" in body
    for h in HISTOGRAMS + ["ferrite_model_load_duration_seconds"]:
        assert f"# TYPE {h} histogram" in body, h


def test_success_counted(server):
    fl.grpc_infer_add_sub(server.grpc_client())  # make sure the series exists
    before = fl.metric_sum(_samples(server), "ferrite_requests_total", model="add_sub", outcome="success")
    c = server.grpc_client()
    for _ in range(5):
        fl.grpc_infer_add_sub(c)
    c.close()
    h = server.http_client()
    a = np.ones((1, 16), np.float32)
    for _ in range(3):
        ins = [httpclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
        for i in ins:
            i.set_data_from_numpy(a)
        h.infer("add_sub", ins)
    h.close()
    after = fl.metric_sum(_samples(server), "ferrite_requests_total", model="add_sub", outcome="success")
    assert after - before == 8, f"ferrite_requests_total{{model=add_sub,outcome=success}} went {before} -> {after}"


def test_failures_counted_by_reason(server):
    def failures(samples):
        return {
            lab["outcome"]: v
            for lab, v in fl.metric_find(samples, "ferrite_requests_total", model="add_sub")
            if lab.get("outcome") != "success"
        }

    before = failures(_samples(server))
    c = server.grpc_client()
    for _ in range(3):
        bad = grpcclient.InferInput("INPUT0", [1, 15], "FP32").set_data_from_numpy(np.ones((1, 15), np.float32))
        ok1 = grpcclient.InferInput("INPUT1", [1, 16], "FP32").set_data_from_numpy(np.ones((1, 16), np.float32))
        try:
            c.infer("add_sub", [bad, ok1])
            raise AssertionError("bad shape accepted")
        except InferenceServerException as e:
            assert fl.grpc_status(e) == "INVALID_ARGUMENT"
    c.close()
    after = failures(_samples(server))
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    grown = {k: d for k, d in delta.items() if d}
    assert sum(grown.values()) == 3, f"failure counters for add_sub changed by {grown} (all: {after})"
    assert len(grown) == 1, f"3 identical failures should land in one outcome label: {grown}"
    (label,) = grown
    assert label not in ("", "success"), label


def test_queue_duration_and_request_duration_observed(server):
    s0 = _samples(server)
    fl.grpc_infer_add_sub(server.grpc_client())
    s1 = _samples(server)
    for h in ("ferrite_request_duration_seconds", "ferrite_queue_duration_seconds", "ferrite_compute_duration_seconds"):
        c0 = fl.metric_sum(s0, h + "_count", model="add_sub")
        c1 = fl.metric_sum(s1, h + "_count", model="add_sub")
        assert c1 > c0, f"{h}_count{{model=add_sub}} did not grow ({c0} -> {c1})"
        assert fl.metric_find(s1, h + "_bucket", model="add_sub", le="+Inf"), f"{h} has no +Inf bucket"
        assert fl.metric_sum(s1, h + "_sum", model="add_sub") > 0


def test_gauges_per_model(server):
    s = _samples(server)
    for g in ("ferrite_queue_depth", "ferrite_inflight_requests"):
        for model in ("add_sub", "mlp", "slow", "strings"):
            found = fl.metric_find(s, g, model=model)
            assert found, f"no {g}{{model={model!r}}} on /metrics"
            assert all(v >= 0 for _, v in found)
    # idle now: nothing queued for add_sub
    assert fl.metric_sum(s, "ferrite_queue_depth", model="add_sub") == 0


def test_model_load_duration(server):
    s = _samples(server)
    assert fl.metric_sum(s, "ferrite_model_load_duration_seconds_count", model="add_sub") >= 1
    assert fl.metric_sum(s, "ferrite_model_load_duration_seconds_count", model="mlp") >= 1


def test_failure_reasons_get_distinct_labels(server):
    """A bad input and a full queue on the same model are counted under different outcomes."""

    def outcomes():
        return {
            lab["outcome"]: v
            for lab, v in fl.metric_find(_samples(server), "ferrite_requests_total", model="slow")
            if lab.get("outcome") != "success"
        }

    before = outcomes()
    c = server.grpc_client()
    bad = grpcclient.InferInput("INPUT0", [1, 3], "FP32").set_data_from_numpy(np.ones((1, 3), np.float32))
    try:
        c.infer("slow", [bad])
        raise AssertionError("bad shape accepted")
    except InferenceServerException as e:
        assert fl.grpc_status(e) == "INVALID_ARGUMENT"
    c.close()
    after_invalid = outcomes()
    grown = {k for k in after_invalid if after_invalid[k] > before.get(k, 0)}
    assert len(grown) == 1, f"one invalid request changed outcomes {grown}"
    (invalid_label,) = grown

    burst = fl.burst_until_refused(server, "slow", lambda e: fl.grpc_status(e) == "RESOURCE_EXHAUSTED")
    codes = ["OK" if e is None else fl.grpc_status(e) for e in burst]
    n_full = codes.count("RESOURCE_EXHAUSTED")
    assert n_full >= 1, codes
    after_full = outcomes()
    grown = {k: after_full[k] - after_invalid.get(k, 0) for k in after_full if after_full[k] > after_invalid.get(k, 0)}
    assert sum(grown.values()) == n_full, f"{n_full} refusals, counters grew {grown}"
    assert invalid_label not in grown, f"queue-full refusals counted under the invalid-input outcome {invalid_label!r}"
