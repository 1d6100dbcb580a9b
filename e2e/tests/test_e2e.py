"""End to end on the local single-node cluster (issue 4): Helm install, apply,
infer, autoscale, survive faults, clean up. Run with `make e2e`.

Each scenario works in its own namespace and removes it afterwards; the
operator is installed once per session with Helm (conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import ferrite_e2e as e2e
from conftest import record
from ferrite_e2e import apply, eventually, kubectl, kubectl_json, log, model_deployment

# Autoscaling settings of the scaling scenarios: short, so the test is too.
SCRAPE_S = 2
STABILIZATION_S = 20


def slow_spec(**extra) -> dict:
    """The slow model (one ~100-200 ms inference at a time per replica)."""
    return {
        "model": {"name": "slow"},
        "runtime": {"intraOpThreads": 1, "instances": 1},
        "batching": {"maxBatchSize": 1, "maxQueueSize": 64},
        **extra,
    }


def slow_md(name: str, model_server, **spec) -> dict:
    md = model_deployment(name, model_server.url("slow.onnx"), **slow_spec(**spec))
    md["spec"]["model"]["uri"] = model_server.url("slow.onnx")
    return md


def lease_holder(operator) -> str:
    return kubectl("-n", operator["namespace"], "get", "lease", "ferrite-operator-leader",
                   "-o", "jsonpath={.spec.holderIdentity}", check=False).strip()


def operator_pods(operator) -> list[dict]:
    return kubectl_json("-n", operator["namespace"], "get", "pods",
                        "-l", "app.kubernetes.io/name=ferrite,app.kubernetes.io/component=operator")["items"]


# ---------------------------------------------------------------- 1
def test_1_helm_install_apply_ready_infer(operator, model_server, namespace):
    # The chart's operator: two replicas, one leading.
    pods = operator_pods(operator)
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    eventually("an operator holds the lease", 60, lambda: lease_holder(operator))
    # The holder identity is "<pod name>_<process suffix>" (operator/src/main.rs).
    assert lease_holder(operator).rsplit("_", 1)[0] in [p["metadata"]["name"] for p in pods]

    t0 = time.monotonic()
    apply(namespace, model_deployment("mlp", model_server.url("mlp.onnx"), replicas=1,
                                      runtime={"intraOpThreads": 1}))
    e2e.wait_ready(namespace, "mlp")
    record("apply_to_ready_s", round(time.monotonic() - t0, 1))
    assert any("mlp.onnx" in r for r in model_server.requests), "the model was not fetched over HTTP"

    md = e2e.get_mdep(namespace, "mlp")
    status = md["status"]
    assert status["readyReplicas"] == 1 and status["observedGeneration"] == md["metadata"]["generation"]
    assert status["endpoints"]["grpc"] == f"mlp.{namespace}.svc:8001"
    ready = e2e.condition(md, "Ready")
    assert ready["reason"] == "ModelServing", ready

    ip = e2e.service_ip(namespace, "mlp")
    x = np.random.default_rng(0).standard_normal((3, e2e.models.MLP_IN)).astype(np.float32)
    expected = e2e.models.mlp_reference(x)
    grpc = grpcclient.InferenceServerClient(f"{ip}:8001")
    assert grpc.is_model_ready("mlp")
    request = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    np.testing.assert_allclose(grpc.infer("mlp", [request]).as_numpy("OUTPUT0"), expected, rtol=1e-5, atol=1e-5)
    http = httpclient.InferenceServerClient(f"{ip}:8000")
    request = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    request.set_data_from_numpy(x)
    np.testing.assert_allclose(http.infer("mlp", [request]).as_numpy("OUTPUT0"), expected, rtol=1e-5, atol=1e-5)
    log(f"inference through Service {ip} (gRPC and HTTP) matches the reference")


# ---------------------------------------------------------------- 2
def test_2_autoscale_up_on_load_and_down_after_window(operator, model_server, namespace):
    apply(namespace, slow_md("slow", model_server, autoscaling={
        "minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4,
        "scrapeIntervalSeconds": SCRAPE_S, "scaleDownStabilizationSeconds": STABILIZATION_S}))
    e2e.wait_ready(namespace, "slow")
    ip = e2e.service_ip(namespace, "slow")
    time.sleep(2 * SCRAPE_S)
    assert e2e.spec_replicas(namespace, "slow") == 1, "idle: minReplicas"

    load = e2e.slow_load(ip, threads=12)
    burst = time.monotonic()
    try:
        up = eventually("the autoscaler scales up", 60,
                        lambda: e2e.spec_replicas(namespace, "slow") > 1 and time.monotonic(), interval=0.2)
        record("burst_to_scale_up_s", round(up - burst, 1))
        ready = eventually("a new replica is Ready", 120,
                           lambda: e2e.ready_replicas(namespace, "slow") > 1 and time.monotonic(), interval=0.3)
        record("burst_to_new_replica_ready_s", round(ready - burst, 1))
        time.sleep(4)
        peak = e2e.spec_replicas(namespace, "slow")
    finally:
        stats = load.stop()
    stopped = time.monotonic()
    record("autoscale_peak_replicas", peak)
    md = e2e.get_mdep(namespace, "slow")
    assert md["status"].get("lastScaleTime"), md["status"]
    events = kubectl("-n", namespace, "get", "events", "--field-selector", "reason=ScaledUp", "-o", "name")
    assert events.strip(), "no ScaledUp event"

    down = eventually("the autoscaler scales back down to 1", STABILIZATION_S + 90,
                      lambda: e2e.spec_replicas(namespace, "slow") == 1 and time.monotonic(), interval=0.5)
    record("load_stop_to_scale_down_s", round(down - stopped, 1))
    record("autoscale_failed_requests", stats.failed)
    record("autoscale_requests_ok", stats.ok)
    record("autoscale_connect_retries", stats.connect_retries)
    assert up - burst <= 2 * SCRAPE_S + 1.0, f"scale-up took {up - burst:.1f} s, more than two scrape intervals"
    # Not before the window (a scrape interval of slack for when the load
    # really stopped being seen), and not long after it.
    assert down - stopped >= STABILIZATION_S - SCRAPE_S, f"scaled down after {down - stopped:.1f} s"
    assert stats.failed == 0, stats.errors


# ---------------------------------------------------------------- 3
def test_3_rollout_under_load_zero_failures(operator, model_server, namespace):
    apply(namespace, model_deployment("mlp", model_server.url("mlp.onnx"), replicas=2,
                                      runtime={"intraOpThreads": 1}))
    e2e.wait_ready(namespace, "mlp")
    ip = e2e.service_ip(namespace, "mlp")
    load = e2e.mlp_load(ip, threads=4, pause=0.01)
    try:
        time.sleep(3)
        generation = e2e.get_mdep(namespace, "mlp")["metadata"]["generation"]
        t0 = time.monotonic()
        kubectl("-n", namespace, "patch", "mdep", "mlp", "--type=merge",
                "-p", '{"spec": {"model": {"uri": "%s"}}}' % model_server.url("mlp-v2.onnx"))

        def rolled_out():
            md = e2e.get_mdep(namespace, "mlp")
            d = e2e.deployment(namespace, "mlp")
            st = d.get("status") or {}
            c = e2e.condition(md, "Progressing")
            return (md["status"].get("observedGeneration", 0) > generation
                    and st.get("updatedReplicas") == 2 and st.get("readyReplicas") == 2
                    and st.get("replicas") == 2 and c and c["status"] == "False")

        eventually("the new version is rolled out", 240, rolled_out)
        record("rollout_s", round(time.monotonic() - t0, 1))
        # The old pods still answer on their open connections while they wait
        # out preStop and drain; once they are gone, only the new version does.
        eventually("the old pods are gone", 120,
                   lambda: not any(p["metadata"].get("deletionTimestamp") for p in e2e.pods(namespace, "mlp")))
        record("rollout_to_old_pods_gone_s", round(time.monotonic() - t0, 1))
        before = dict(load.stats.answers)
        time.sleep(3)
        after = dict(load.stats.answers)
    finally:
        stats = load.stop()
    record("rollout_failed_requests", stats.failed)
    record("rollout_requests_ok", stats.ok)
    record("rollout_connect_retries", stats.connect_retries)
    record("rollout_answers", stats.answers)
    record("rollout_max_latency_s", stats.max_latency_s)
    log(f"rollout: slow requests {stats.slow}; errors and retries {stats.errors}")
    assert after.get("v1", 0) == before.get("v1", 0), "the old version still answers after the rollout"
    assert stats.answers.get("v2", 0) > 0 and stats.answers.get("v1", 0) > 0
    assert stats.failed == 0, stats.errors


# ---------------------------------------------------------------- 4
def test_4a_kill_server_pod_under_load(operator, model_server, namespace):
    apply(namespace, slow_md("slow", model_server, replicas=2))
    e2e.wait_ready(namespace, "slow")
    ip = e2e.service_ip(namespace, "slow")
    victim = sorted(p["metadata"]["name"] for p in e2e.pods(namespace, "slow"))[0]
    watch = e2e.Watch(namespace, "mdep", "slow")
    load = e2e.slow_load(ip, threads=4)
    try:
        time.sleep(3)
        t0 = time.monotonic()
        kubectl("-n", namespace, "delete", "pod", victim, "--wait=false")

        def replaced():
            names = [p["metadata"]["name"] for p in e2e.pods(namespace, "slow")
                     if not p["metadata"].get("deletionTimestamp")]
            return victim not in names and e2e.ready_replicas(namespace, "slow") == 2

        eventually("the replacement pod is Ready", 180, replaced)
        record("server_pod_kill_to_replacement_ready_s", round(time.monotonic() - t0, 1))
        eventually("the ModelDeployment reports 2/2 ready", 60,
                   lambda: e2e.get_mdep(namespace, "slow")["status"].get("readyReplicas") == 2)
        time.sleep(2)
    finally:
        stats = load.stop()
        watch.stop()
    record("server_pod_kill_failed_requests", stats.failed)
    record("server_pod_kill_requests_ok", stats.ok)
    record("server_pod_kill_connect_retries", stats.connect_retries)
    record("server_pod_kill_max_latency_s", stats.max_latency_s)
    log(f"pod kill: slow requests {stats.slow}; errors and retries {stats.errors}")
    # The status told what happened: fewer ready replicas (or a rollout of
    # the replacement), then all ready again.
    states = [((o.get("status") or {}).get("readyReplicas"),
               (e2e.condition(o, "Progressing") or {}).get("reason"),
               (e2e.condition(o, "Ready") or {}).get("message")) for _, o in watch.seen]
    log(f"ModelDeployment status while the pod was replaced: {states}")
    assert any(s[0] == 1 for s in states), f"status never showed the lost replica: {states}"
    final = e2e.get_mdep(namespace, "slow")
    assert e2e.condition(final, "Ready")["status"] == "True"
    assert stats.failed == 0, stats.errors


def test_4b_kill_leading_operator(operator, model_server, namespace):
    """SIGKILL the leading operator's process (a crash: the lease is not
    released); another operator process takes over after the lease expires and
    its autoscaler scales the model up; no request fails meanwhile."""
    apply(namespace, slow_md("slow", model_server, autoscaling={
        "minReplicas": 1, "maxReplicas": 2, "targetQueueDepth": 4,
        "scrapeIntervalSeconds": SCRAPE_S, "scaleDownStabilizationSeconds": STABILIZATION_S}))
    e2e.wait_ready(namespace, "slow")
    ip = e2e.service_ip(namespace, "slow")
    leader = eventually("an operator leads", 60, lambda: lease_holder(operator))
    # The identity is "<pod name>_<process suffix>" (operator/src/main.rs).
    leader_pod = leader.rsplit("_", 1)[0]
    pods = {p["metadata"]["name"]: p for p in operator_pods(operator)}
    assert leader_pod in pods, f"lease holder {leader} is none of the operator pods {sorted(pods)}"
    restarts_before = e2e.restart_count(pods[leader_pod])
    load = e2e.slow_load(ip, threads=12)
    try:
        time.sleep(1)
        log(f"leader {leader}: SIGKILL to its container in pod {leader_pod}")
        t0 = time.monotonic()
        e2e.kill_container(pods[leader_pod])
        new_leader = eventually("another operator process takes over", 90,
                                lambda: (h := lease_holder(operator)) and h != leader and h, interval=0.5)
        record("operator_sigkill_to_new_leader_s", round(time.monotonic() - t0, 1))
        record("operator_new_leader_is_other_pod", not new_leader.startswith(leader_pod + "_"))
        eventually("the new leader's autoscaler scales up", 60,
                   lambda: e2e.spec_replicas(namespace, "slow") > 1, interval=0.3)
        record("operator_sigkill_to_scale_up_s", round(time.monotonic() - t0, 1))
    finally:
        stats = load.stop()
    record("operator_kill_failed_requests", stats.failed)
    record("operator_kill_requests_ok", stats.ok)
    eventually("the killed container restarted and the operator Deployment is whole again", 120,
               lambda: e2e.restart_count(e2e.pod(operator["namespace"], leader_pod)) > restarts_before
               and (kubectl_json("-n", operator["namespace"], "get", "deployment",
                                 "ferrite-e2e-operator").get("status") or {}).get("readyReplicas") == 2)
    assert stats.failed == 0, stats.errors


# ---------------------------------------------------------------- 5
def test_5_unfetchable_and_unloadable_models_say_why(operator, model_server, namespace):
    apply(namespace, model_deployment("good", model_server.url("mlp.onnx"), replicas=1,
                                      model={"uri": model_server.url("mlp.onnx"), "name": "mlp"},
                                      runtime={"intraOpThreads": 1}))
    e2e.wait_ready(namespace, "good")
    ip = e2e.service_ip(namespace, "good")
    restarts_before = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
                       for p in operator_pods(operator)}
    load = e2e.mlp_load(ip, threads=2, pause=0.02)
    try:
        apply(namespace, model_deployment("missing", model_server.url("no-such-model.onnx"), replicas=1))
        apply(namespace, model_deployment("garbage", model_server.url("garbage.onnx"), replicas=1))

        def reason(name, want):
            md = e2e.get_mdep(namespace, name)
            ready, degraded = e2e.condition(md, "Ready"), e2e.condition(md, "Degraded")
            if ready and ready["status"] == "False" and ready["reason"] == want:
                assert degraded and degraded["status"] == "True" and degraded["reason"] == want, degraded
                return ready
            return None

        t0 = time.monotonic()
        fetch = eventually("FetchFailed on the 404 model", 180, lambda: reason("missing", "FetchFailed"))
        record("fetch_failed_reported_s", round(time.monotonic() - t0, 1))
        load_failed = eventually("ModelLoadFailed on the garbage model", 180,
                                 lambda: reason("garbage", "ModelLoadFailed"))
        record("model_load_failed_reported_s", round(time.monotonic() - t0, 1))
        log(f"missing: {fetch['message']}")
        log(f"garbage: {load_failed['message']}")
        assert "404" in fetch["message"] or "not found" in fetch["message"].lower(), fetch
        assert "no-such-model.onnx" in fetch["message"], fetch
        warnings = kubectl("-n", namespace, "get", "events", "--field-selector", "type=Warning",
                           "-o", "jsonpath={range .items[*]}{.reason}{'\\n'}{end}")
        assert "FetchFailed" in warnings and "ModelLoadFailed" in warnings, warnings
        time.sleep(2)
    finally:
        stats = load.stop()
    # Nothing else disturbed: the good model kept serving, the operator kept running.
    good = e2e.get_mdep(namespace, "good")
    assert e2e.condition(good, "Ready")["status"] == "True"
    restarts_after = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"]
                      for p in operator_pods(operator)}
    assert restarts_after == restarts_before, (restarts_before, restarts_after)
    record("bad_models_good_model_failed_requests", stats.failed)
    assert stats.failed == 0 and stats.ok > 0, stats.errors


# ---------------------------------------------------------------- 6
def test_6_delete_removes_every_owned_object(operator, model_server, namespace):
    apply(namespace, model_deployment("owned", model_server.url("mlp.onnx"), replicas=2,
                                      runtime={"intraOpThreads": 1}))
    e2e.wait_ready(namespace, "owned")
    md = e2e.get_mdep(namespace, "owned")
    uid = md["metadata"]["uid"]
    kinds = "deployments,replicasets,pods,services,poddisruptionbudgets,endpointslices,serviceaccounts,configmaps,secrets"

    def owned_objects():
        items = kubectl_json("-n", namespace, "get", kinds)["items"]
        uids = {uid}
        # Everything whose owner chain leads to the ModelDeployment.
        changed = True
        found = {}
        while changed:
            changed = False
            for item in items:
                meta = item["metadata"]
                if meta["uid"] in found:
                    continue
                if any(o["uid"] in uids for o in meta.get("ownerReferences") or []):
                    found[meta["uid"]] = f"{item['kind']}/{meta['name']}"
                    uids.add(meta["uid"])
                    changed = True
        return sorted(found.values())

    before = owned_objects()
    log(f"owned by the ModelDeployment: {before}")
    for kind in ("Deployment/owned", "Service/owned", "PodDisruptionBudget/owned"):
        assert kind in before, before
    assert sum(1 for o in before if o.startswith("Pod/")) == 2, before
    assert any(o.startswith("ReplicaSet/") for o in before) and any(o.startswith("EndpointSlice/") for o in before)

    t0 = time.monotonic()
    kubectl("-n", namespace, "delete", "mdep", "owned", "--wait=true", "--timeout=60s")

    def all_gone():
        left = kubectl("-n", namespace, "get", kinds, "-o", "jsonpath={range .items[*]}{.kind}/{.metadata.name}\n{end}")
        remaining = [o for o in before if o in left.splitlines()]
        return not remaining

    eventually(f"every owned object is gone ({len(before)} objects)", 120, all_gone)
    record("delete_to_all_owned_gone_s", round(time.monotonic() - t0, 1))
    assert kubectl("-n", namespace, "get", "pods", "-l", "ferrite.dev/model-deployment=owned", "-o", "name").strip() == ""


# ---------------------------------------------------------------- 7
def test_7_llm_model_deployment_answers_chat_completions(operator, model_server, namespace):
    """An LLM is a ModelDeployment like any other: its model directory
    (fetched as a .tar over HTTP) loads, the Ready condition comes, and the
    OpenAI-compatible API answers through the Service."""
    if not e2e.LLM_MODEL_DIR.is_dir():
        pytest.fail(f"{e2e.LLM_MODEL_DIR} is missing: run `make models`", pytrace=False)
    t0 = time.monotonic()
    apply(namespace, model_deployment("smollm2", model_server.url("smollm2.tar"), replicas=1,
                                      runtime={"intraOpThreads": 2}))
    e2e.wait_ready(namespace, "smollm2", timeout=300)
    record("llm_apply_to_ready_s", round(time.monotonic() - t0, 1))
    ip = e2e.service_ip(namespace, "smollm2")
    body = json.dumps({"model": "smollm2", "temperature": 0, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
    request = urllib.request.Request(f"http://{ip}:8000/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    t1 = time.monotonic()
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    record("llm_chat_completion_s", round(time.monotonic() - t1, 2))
    text = answer["choices"][0]["message"]["content"]
    log(f"smollm2 through its Service: {text!r} (usage {answer['usage']})")
    assert "Paris" in text, answer
    assert answer["usage"]["completion_tokens"] > 0


# ---------------------------------------------------------------- 8
def test_8_hostile_clients_and_specs_change_nothing(operator, model_server, namespace):
    """Issue 12 on the cluster: an unload POST through the Service (which once
    made the pod unready and restarted it) is refused and the pod keeps
    serving; a spec outside the operator's policy gets PolicyViolation and no
    pods; a URI carrying credentials is refused by the API server."""
    apply(namespace, model_deployment("guarded", model_server.url("mlp.onnx"), replicas=1,
                                      runtime={"intraOpThreads": 1}))
    e2e.wait_ready(namespace, "guarded")
    ip = e2e.service_ip(namespace, "guarded")
    for _ in range(5):
        request = urllib.request.Request(f"http://{ip}:8000/v2/repository/models/guarded/unload", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403, refused.value.code
    # Longer than the readiness probe's failure window: the pod stays Ready, unrestarted.
    time.sleep(15)
    pods = kubectl_json("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/instance=guarded")["items"]
    assert pods and all(p["status"]["containerStatuses"][-1]["restartCount"] == 0 for p in pods), pods
    assert e2e.condition(e2e.get_mdep(namespace, "guarded"), "Ready")["status"] == "True"
    assert grpcclient.InferenceServerClient(f"{ip}:8001").is_model_ready("guarded")

    apply(namespace, model_deployment("preload", model_server.url("mlp.onnx"), replicas=1,
                                      env=[{"name": "LD_PRELOAD", "value": "/models/evil.so"}]))
    refused = eventually("the policy refuses LD_PRELOAD", 60, lambda: (
        lambda c: c if c and c.get("reason") == "PolicyViolation" else None)(
            e2e.condition(e2e.get_mdep(namespace, "preload"), "Ready")))
    assert refused["status"] == "False" and "LD_" in refused["message"], refused
    assert not kubectl("-n", namespace, "get", "deployment", "preload", "--ignore-not-found", "-o", "name").strip()

    leaky = model_deployment("leaky", "https://user:secret@models.example/mlp.onnx", replicas=1)
    out = subprocess.run([e2e.KUBECTL, "-n", namespace, "apply", "-f", "-"], input=json.dumps(leaky),
                         capture_output=True, text=True)
    assert out.returncode != 0 and "uriFrom" in out.stderr, out.stderr


# ---------------------------------------------------------------- 9
def test_9_cluster_dns_pod_reaches_service_by_name(cluster, namespace):
    """Cluster DNS (CoreDNS on the bridge address, e2e/cluster/up.sh): a pod
    reaches a Service by `NAME`, `NAME.NS.svc` and `NAME.NS.svc.cluster.local`,
    as in a real cluster; a missing name in the cluster domain is answered
    NXDOMAIN by CoreDNS itself (no name outside the machine is looked up)."""
    apply(namespace, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "hello"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "hello"}},
                 "template": {"metadata": {"labels": {"app": "hello"}},
                              "spec": {"automountServiceAccountToken": False,
                                       "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                                       "containers": [{"name": "hello", "image": e2e.HELLO_IMAGE,
                                                       "imagePullPolicy": "Never",
                                                       "ports": [{"containerPort": 8080}],
                                                       "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                                                          "periodSeconds": 1}}]}}},
    })
    apply(namespace, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hello"},
                      "spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    kubectl("-n", namespace, "rollout", "status", "deploy/hello", "--timeout=90s", timeout=100)
    queries0, forwarded0 = e2e.dns_counters()
    t0 = time.monotonic()
    for i, name in enumerate(["hello", f"hello.{namespace}.svc", f"hello.{namespace}.svc.cluster.local"]):
        phase, out = e2e.run_pod(namespace, f"by-name-{i}", ["-get", f"http://{name}/"])
        log(f"pod -> http://{name}/: {phase}: {out.strip()[:100]}")
        assert phase == "Succeeded" and out.startswith("hello from hello-"), (name, phase, out)
    record("dns_three_pods_by_service_name_s", round(time.monotonic() - t0, 1))
    phase, out = e2e.run_pod(namespace, "missing", ["-get", f"http://nosuch.{namespace}.svc.cluster.local./"])
    assert phase == "Failed" and "no such host" in out, (phase, out)
    queries, forwarded = e2e.dns_counters()
    record("dns_queries_answered_by_cluster_dns", queries - queries0)
    # The lookups reached CoreDNS, and it answered them all itself.
    assert queries - queries0 >= 4, (queries0, queries)
    assert forwarded == forwarded0, f"{forwarded - forwarded0} queries went to the host's resolver"


# ---------------------------------------------------------------- 10
CASCADE_PROMPT = "What is the capital of France?"
MICRO_QUEUE = {"maxBatchSize": 1, "maxQueueSize": 1}  # a burst of a few requests fills it
BURST = 12


def escalation_condition(namespace: str) -> dict | None:
    return e2e.condition(e2e.get_mdep(namespace, "micro"), "EscalationTargetReachable")


def test_10_micro_escalates_to_macro_by_service_name(operator, model_server, namespace):
    """Issue 14 on the cluster: ModelDeployment `micro` (SmolLM2 int4)
    escalates to ModelDeployment `macro` (SmolLM2 fp32 standing in), named by
    reference: the operator resolves it to http://macro.<ns>.svc:8000/v1 and
    the pod reaches it through cluster DNS. Forced and confidence escalations
    arrive at the macro pod (headers, both pods' metrics, the micro status);
    a burst past the micro queue is forwarded (onQueueFull) with no failed
    request; with the macro deployment deleted the micro one keeps answering
    (marked as a fallback) and its condition says the target is gone."""
    for model_dir in (e2e.LLM_MODEL_DIR, e2e.LLM_FP32_MODEL_DIR):
        if not model_dir.is_dir():
            pytest.fail(f"{model_dir} is missing: run `make models`", pytrace=False)
    t0 = time.monotonic()
    apply(namespace, model_deployment("macro", model_server.url("smollm2-fp32.tar"), replicas=1,
                                      runtime={"intraOpThreads": 1}))
    # Threshold 0 escalates every answer (its log-probabilities are below 0):
    # `x-ferrite-escalate: never` is the way to a local answer.
    apply(namespace, model_deployment(
        "micro", model_server.url("smollm2.tar"), replicas=1, runtime={"intraOpThreads": 1},
        batching=MICRO_QUEUE,
        escalation={"mode": "cascade", "target": {"modelDeployment": "macro"},
                    "confidence": {"quantile": 0.1, "threshold": 0.0},
                    "onQueueFull": True, "timeoutSeconds": 30}))
    e2e.wait_ready(namespace, "macro", timeout=300)
    e2e.wait_ready(namespace, "micro", timeout=300)
    record("cascade_apply_to_both_ready_s", round(time.monotonic() - t0, 1))
    micro = e2e.service_ip(namespace, "micro")
    macro_served = lambda: e2e.metric(e2e.pod_metrics(namespace, "macro"), "ferrite_requests_total",  # noqa: E731
                                      model="macro", outcome="success")
    before = macro_served()

    local = e2e.chat(micro, "micro", CASCADE_PROMPT, {"x-ferrite-escalate": "never"})
    assert local.status == 200, local
    assert local.headers.get("x-ferrite-served-by") == "micro", local.headers
    # `never` answers without judging: no confidence, no escalation.
    assert "x-ferrite-escalation" not in local.headers and "x-ferrite-confidence" not in local.headers, local.headers

    t1 = time.monotonic()
    forced = e2e.chat(micro, "micro", CASCADE_PROMPT, {"x-ferrite-escalate": "always"})
    record("cascade_forced_escalation_s", round(time.monotonic() - t1, 2))
    assert forced.status == 200, forced
    assert forced.headers.get("x-ferrite-served-by") == "macro", forced.headers
    assert forced.headers.get("x-ferrite-escalation") == "forced", forced.headers
    assert forced.body["choices"][0]["message"]["content"], forced.body

    unsure = e2e.chat(micro, "micro", CASCADE_PROMPT)
    assert unsure.status == 200, unsure
    assert unsure.headers.get("x-ferrite-served-by") == "macro", unsure.headers
    assert unsure.headers.get("x-ferrite-escalation") == "confidence", unsure.headers
    log(f"micro: {local.body['choices'][0]['message']['content']!r}; "
        f"macro: {forced.body['choices'][0]['message']['content']!r}")

    # Both escalations arrived at the macro pod, and only they did.
    assert macro_served() - before == 2, (before, macro_served())
    text = e2e.pod_metrics(namespace, "micro")
    assert e2e.metric(text, "ferrite_escalations_total", model="micro", reason="forced") == 1, text
    assert e2e.metric(text, "ferrite_escalations_total", model="micro", reason="confidence") == 1, text
    assert e2e.metric(text, "ferrite_escalation_target_up", model="micro") == 1, text

    def reported():
        md = e2e.get_mdep(namespace, "micro")
        status = (md.get("status") or {}).get("escalation") or {}
        c = e2e.condition(md, "EscalationTargetReachable")
        return (md if status.get("escalated", 0) >= 2 and status.get("targetReachable") is True
                and c and c["status"] == "True" else None)
    md = eventually("micro's status shows the escalations and a reachable target", 90, reported)
    log(f"micro status.escalation {md['status']['escalation']}, condition {escalation_condition(namespace)}")
    assert 0 < md["status"]["escalation"]["rate"] <= 1, md["status"]

    # A burst past the micro queue (1 running + 1 waiting): the rest is
    # forwarded instead of refused.
    before = macro_served()
    answers: list[e2e.ChatAnswer | Exception] = []
    lock = threading.Lock()

    def one():
        try:
            a = e2e.chat(micro, "micro", CASCADE_PROMPT, timeout=120)
        except Exception as e:  # noqa: BLE001 - every failure counts
            a = e
        with lock:
            answers.append(a)

    t2 = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    record("cascade_burst_s", round(time.monotonic() - t2, 1))
    failed = [a for a in answers if not isinstance(a, e2e.ChatAnswer) or a.status != 200]
    reasons: dict[str, int] = {}
    for a in answers:
        if isinstance(a, e2e.ChatAnswer):
            reason = a.headers.get("x-ferrite-escalation", "none")
            reasons[reason] = reasons.get(reason, 0) + 1
    record("cascade_burst_failed_requests", len(failed))
    record("cascade_burst_escalation_reasons", reasons)
    assert len(answers) == BURST and not failed, failed
    assert reasons.get("queue_full", 0) >= 1, reasons
    assert all(a.headers.get("x-ferrite-served-by") == "macro" for a in answers), reasons
    assert macro_served() - before == BURST
    text = e2e.pod_metrics(namespace, "micro")
    assert e2e.metric(text, "ferrite_escalations_total", model="micro", reason="queue_full") == reasons["queue_full"]

    # The macro deployment goes: the micro one answers itself, marked.
    kubectl("-n", namespace, "delete", "mdep", "macro", "--wait=true", "--timeout=120s", timeout=130)
    eventually("the macro Service is gone", 60, lambda: not kubectl(
        "-n", namespace, "get", "svc", "macro", "--ignore-not-found", "-o", "name").strip())
    # Its pods go after it (garbage collection, then their grace period);
    # until then a pooled connection of the micro pod may still reach one.
    eventually("the macro pods are gone", 120, lambda: not e2e.pods(namespace, "macro"))
    t3 = time.monotonic()
    alone = e2e.chat(micro, "micro", CASCADE_PROMPT, timeout=120)
    record("cascade_fallback_answer_s", round(time.monotonic() - t3, 2))
    assert alone.status == 200, alone
    assert alone.headers.get("x-ferrite-served-by") == "micro", alone.headers
    assert alone.headers.get("x-ferrite-fallback") in ("unreachable", "timeout", "error"), alone.headers
    # judged (so it carries its confidence), meant for the target, answered here
    assert float(alone.headers["x-ferrite-confidence"]) < 0.0, alone.headers
    assert alone.headers.get("x-ferrite-escalation") == "confidence", alone.headers
    assert alone.body["choices"][0]["message"]["content"], alone.body

    def gone():
        c = escalation_condition(namespace)
        return c if c and c["status"] == "False" and c["reason"] in ("TargetMissing", "TargetUnreachable") else None
    c = eventually("micro's condition says the target is missing or unreachable", 90, gone)
    log(f"after deleting macro: {c}")
    assert e2e.metric(e2e.pod_metrics(namespace, "micro"), "ferrite_escalation_target_up", model="micro") == 0
