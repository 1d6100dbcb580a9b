"""Scale to zero and back, and the node model cache, on the local cluster
(issue 15). Run with `make e2e` (after test_e2e.py's scenarios).

- 11: an idle model goes to zero; requests to it are held by the activator
  and answered (HTTP and gRPC, one at a time and 100 at once); a request
  arriving while the model is being scaled down is answered too.
- 12: the cold start from zero, split into its parts (request -> scale
  decision -> pod scheduled -> model on disk -> model loaded -> pod Ready ->
  answer), with the node cache cold and warm, for the tiny MLP and for the
  SmolLM2 LLM (streamed chat completion).

The cold-start figures are recorded (docs/scale-to-zero.md has the table),
not asserted: speed targets belong in benchmarks. What is asserted is that
no request fails.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import ferrite_e2e as e2e
from conftest import record
from ferrite_e2e import apply, eventually, kubectl, kubectl_json, log, model_deployment

IDLE_S = 8  # scaleToZeroAfterSeconds of the scenarios: short, so the test is too
SCRAPE_S = 2


def zero_autoscaling(**extra) -> dict:
    return {"minReplicas": 0, "maxReplicas": 3, "targetQueueDepth": 4, "scrapeIntervalSeconds": SCRAPE_S,
            "scaleDownStabilizationSeconds": IDLE_S, "scaleToZeroAfterSeconds": IDLE_S, **extra}


def activator_slice(namespace: str, name: str) -> dict | None:
    return kubectl_json("-n", namespace, "get", "endpointslice", f"{name}-activator", "--ignore-not-found",
                        check=False)


def at_zero(namespace: str, name: str) -> bool:
    """Zero replicas, no pod left, the Service on the activator, and Ready
    still True (reason ScaledToZero): idle, not failing."""
    if e2e.spec_replicas(namespace, name) != 0 or e2e.pods(namespace, name):
        return False
    ready = e2e.condition(e2e.get_mdep(namespace, name), "Ready")
    return bool(ready and ready["status"] == "True" and ready["reason"] == "ScaledToZero"
                and activator_slice(namespace, name))


def wait_zero(namespace: str, name: str, timeout: float = IDLE_S + 90) -> float:
    t0 = time.monotonic()
    eventually(f"{namespace}/{name} is scaled to zero", timeout, lambda: at_zero(namespace, name), interval=0.5)
    return time.monotonic() - t0


def mlp_http(host: str, timeout: float = 120) -> np.ndarray:
    client = httpclient.InferenceServerClient(f"{host}:8000", connection_timeout=timeout, network_timeout=timeout)
    x = httpclient.InferInput("INPUT0", list(e2e.MLP_INPUT.shape), "FP32")
    x.set_data_from_numpy(e2e.MLP_INPUT)
    return client.infer("mlp", [x]).as_numpy("OUTPUT0")


def mlp_grpc(host: str, timeout: float = 120) -> np.ndarray:
    client = grpcclient.InferenceServerClient(f"{host}:8001")
    x = grpcclient.InferInput("INPUT0", list(e2e.MLP_INPUT.shape), "FP32")
    x.set_data_from_numpy(e2e.MLP_INPUT)
    return client.infer("mlp", [x], client_timeout=timeout).as_numpy("OUTPUT0")


MLP_EXPECTED = e2e.mlp_reference(e2e.MLP_INPUT, e2e.models.mlp_weights())


def check_mlp(out: np.ndarray) -> None:
    np.testing.assert_allclose(out.reshape(1, -1), MLP_EXPECTED, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- 11
def test_11_scale_to_zero_holds_requests_and_loses_none(operator, model_server, namespace):
    apply(namespace, model_deployment("mlp", model_server.url("mlp.onnx"), runtime={"intraOpThreads": 1},
                                      autoscaling=zero_autoscaling()))
    e2e.wait_ready(namespace, "mlp")
    ip = e2e.service_ip(namespace, "mlp")

    record("idle_to_zero_s", round(wait_zero(namespace, "mlp"), 1))
    printed = kubectl("-n", namespace, "get", "mdep", "mlp")
    log(f"at zero:\n{printed}")

    # One request at zero, over HTTP: held, then answered.
    t0 = time.monotonic()
    check_mlp(mlp_http(ip))
    record("zero_http_request_answered_s", round(time.monotonic() - t0, 2))
    eventually("the Service is back on the pods", 60, lambda: not activator_slice(namespace, "mlp"))

    # And over gRPC.
    wait_zero(namespace, "mlp")
    t0 = time.monotonic()
    check_mlp(mlp_grpc(ip))
    record("zero_grpc_request_answered_s", round(time.monotonic() - t0, 2))

    # 100 at once, half HTTP and half gRPC.
    wait_zero(namespace, "mlp")
    failures: list[str] = []
    lock = threading.Lock()

    def one(i: int):
        try:
            check_mlp(mlp_http(ip) if i % 2 else mlp_grpc(ip))
        except Exception as e:  # noqa: BLE001 - every failure counts
            with lock:
                failures.append(f"{'http' if i % 2 else 'grpc'} {type(e).__name__}: {e}"[:300])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    record("zero_100_concurrent_all_answered_s", round(time.monotonic() - t0, 2))
    record("zero_100_concurrent_failed_requests", len(failures))
    assert not failures, failures
    peak = e2e.spec_replicas(namespace, "mlp")
    record("zero_100_concurrent_replicas", peak)
    assert peak >= 2, f"100 held requests at targetQueueDepth 4 asked for only {peak} replica(s)"

    # A request during scale-down: once the operator has switched the
    # Service to the activator (its first step) and while the pod still
    # runs, and again while it terminates.
    eventually("back to one replica", IDLE_S + 60, lambda: e2e.spec_replicas(namespace, "mlp") == 1, interval=0.5)
    eventually("the scale-down to zero has begun (Service on the activator, pod still there)", IDLE_S + 60,
               lambda: activator_slice(namespace, "mlp") and e2e.pods(namespace, "mlp"), interval=0.2)
    check_mlp(mlp_http(ip))
    wait_zero(namespace, "mlp")
    check_mlp(mlp_grpc(ip))  # up from zero again, for a second scale-down
    during: list[str] = []
    eventually("the scale-down to zero has begun again", IDLE_S + 60,
               lambda: activator_slice(namespace, "mlp") and e2e.pods(namespace, "mlp"), interval=0.2)
    eventually("the pod is terminating", 30, lambda: e2e.spec_replicas(namespace, "mlp") == 0, interval=0.1)
    for fn in (mlp_grpc, mlp_http):
        try:
            check_mlp(fn(ip))
        except Exception as e:  # noqa: BLE001
            during.append(f"{fn.__name__}: {e}")
    record("scale_down_requests_failed", len(during))
    assert not during, during

    text = activator_metrics(operator)
    total = e2e.metric(text, "ferrite_activator_requests_total", namespace=namespace, name="mlp")
    record("activator_requests_total", total)
    assert total >= 100, text[:2000]


def activator_metrics(operator) -> str:
    texts = []
    for p in kubectl_json("-n", operator["namespace"], "get", "pods",
                          "-l", "app.kubernetes.io/component=activator")["items"]:
        ip = (p.get("status") or {}).get("podIP")
        if ip:
            with urllib.request.urlopen(f"http://{ip}:8002/metrics", timeout=10) as response:
                texts.append(response.read().decode())
    assert texts, "no activator pod found"
    return "\n".join(texts)


# ---------------------------------------------------------------- 12
def log_times(namespace: str, pod: str, container: str) -> list[tuple[float, str]]:
    """A container's log lines with the time the runtime received each
    (`kubectl logs --timestamps`: RFC 3339 with nanoseconds, UTC)."""
    out = kubectl("-n", namespace, "logs", pod, "-c", container, "--timestamps", check=False)
    lines = []
    for line in out.splitlines():
        stamp, _, text = line.partition(" ")
        try:
            lines.append((parse_time(stamp), text))
        except ValueError:
            continue
    return lines


def parse_time(stamp: str) -> float:
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def cold_start(namespace: str, name: str, ask) -> dict[str, float]:
    """Sends `ask()` to the model at zero and splits the time to its answer.
    Times are wall clock on this machine, which is the node (its container
    runtime stamps the log lines)."""
    deployments = e2e.Watch(namespace, "deployment", name)
    pods = PodWatch(namespace, name)
    time.sleep(1)  # both watches have listed
    offset = time.time() - time.monotonic()
    t_request = time.time()
    ask()
    t_answer = time.time()
    deployments.stop()
    pods.stop()
    t_decision = next(t + offset for t, d in deployments.seen if (d["spec"].get("replicas") or 0) > 0)
    pod, t_scheduled, t_ready = pods.first_ready()
    fetch = log_times(namespace, pod, "fetch")
    server = log_times(namespace, pod, "server")
    assert fetch and server, (fetch, server)
    t_on_disk = fetch[-1][0]
    t_loaded = next(t for t, text in server if '"ready"' in text or text.rstrip().endswith(" ready")
                    or "ready" == json_message(text))
    parts = {
        "decision_s": t_decision - t_request,
        "scheduled_s": t_scheduled + offset - t_decision,
        "model_on_disk_s": t_on_disk - (t_scheduled + offset),
        "model_loaded_s": t_loaded - t_on_disk,
        "pod_ready_s": t_ready + offset - t_loaded,
        "answer_s": t_answer - (t_ready + offset),
        "total_s": t_answer - t_request,
    }
    return {k: round(v, 2) for k, v in parts.items()}


def json_message(text: str) -> str:
    try:
        return json.loads(text).get("fields", {}).get("message", "")
    except (ValueError, AttributeError):
        return ""


class PodWatch(e2e.Watch):
    """Every version of the ModelDeployment's pods (by label)."""

    def __init__(self, namespace: str, name: str):  # noqa: D107 - a Watch over a label, not a name
        import subprocess

        self.seen = []
        self.proc = subprocess.Popen(
            [e2e.KUBECTL, "-n", namespace, "get", "pods", "-l", f"ferrite.dev/model-deployment={name}",
             "-w", "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def first_ready(self) -> tuple[str, float, float]:
        """The first pod seen Ready: its name, when it was first seen
        scheduled (nodeName set) and when Ready (monotonic)."""
        scheduled: dict[str, float] = {}
        for t, p in self.seen:
            name = p["metadata"]["name"]
            if p["spec"].get("nodeName"):
                scheduled.setdefault(name, t)
            if e2e.condition(p, "Ready") and e2e.condition(p, "Ready")["status"] == "True":
                return name, scheduled[name], t
        raise AssertionError(f"no pod was seen Ready among {len(self.seen)} pod versions")


def model_cache_dir() -> Path:
    return Path(e2e.cluster_env()["FERRITE_MODEL_CACHE_DIR"])


def clear_node_cache() -> None:
    """Empties the node's model cache (the test runs on the node, as root)."""
    root = model_cache_dir()
    for entry in root.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def chat_stream(host: str, model: str) -> str:
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 8, "stream": True,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
    request = urllib.request.Request(f"http://{host}:8000/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    text = []
    with urllib.request.urlopen(request, timeout=240) as response:
        assert response.headers.get("content-type", "").startswith("text/event-stream"), response.headers
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def test_12_cold_start_from_zero_with_the_node_cache(operator, model_server, namespace):
    if not e2e.LLM_MODEL_DIR.is_dir():
        pytest.fail(f"{e2e.LLM_MODEL_DIR} is missing: run `make models`", pytrace=False)
    cases = {
        "mlp": (model_server.url("mlp.onnx"), 1, lambda ip: check_mlp(mlp_grpc(ip))),
        "smollm2": (model_server.url("smollm2.tar"), 2, lambda ip: assert_paris(chat_stream(ip, "smollm2"))),
    }
    table = {}
    for name, (uri, threads, ask) in cases.items():
        md = model_deployment(name, uri, runtime={"intraOpThreads": threads},
                              autoscaling=zero_autoscaling(maxReplicas=1))
        md["spec"]["model"]["cache"] = "node"
        apply(namespace, md)
        e2e.wait_ready(namespace, name, timeout=300)
        ip = e2e.service_ip(namespace, name)
        for cache in ("cold", "warm"):
            wait_zero(namespace, name)
            if cache == "cold":
                clear_node_cache()
            parts = cold_start(namespace, name, lambda: ask(ip))
            table[f"{name}_{cache}"] = parts
            record(f"cold_start_{name}_cache_{cache}", parts)
            served = fetch_hit(namespace, name)
            assert served == (cache == "warm"), f"{name} with the cache {cache}: fetch reported hit={served}"
    log("cold start from zero (s): " + json.dumps(table, indent=1))

    # Two pods starting at once on the node download once (the cache's file
    # lock); the model file server counts the downloads.
    clear_node_cache()
    before = downloads(model_server, "mlp-v2.onnx")
    md = model_deployment("pair", model_server.url("mlp-v2.onnx"), replicas=2, runtime={"intraOpThreads": 1})
    md["spec"]["model"].update(cache="node", name="mlp")
    apply(namespace, md)
    e2e.wait_ready(namespace, "pair", timeout=180)
    eventually("both pods are ready", 120, lambda: e2e.ready_replicas(namespace, "pair") == 2)
    fetched = downloads(model_server, "mlp-v2.onnx") - before
    record("node_cache_two_pods_downloads", fetched)
    assert fetched == 1, model_server.requests[-10:]


def downloads(model_server, path: str) -> int:
    return sum(1 for line in model_server.requests if line.startswith(f'"GET /{path} '))


def fetch_hit(namespace: str, name: str) -> bool:
    """Whether the newest pod's fetch found the model in the node cache."""
    newest = max(e2e.pods(namespace, name), key=lambda p: p["metadata"]["creationTimestamp"])
    text = kubectl("-n", namespace, "logs", newest["metadata"]["name"], "-c", "fetch", check=False)
    return "model cache hit" in text


def assert_paris(text: str) -> None:
    assert "Paris" in text, text
