"""Helpers of the end-to-end tests: kubectl/helm, waiting, a model file server
on the cluster bridge, a load generator that counts failed requests, and
the test models.

Everything talks to the local cluster of e2e/cluster (or the one in
$KUBECONFIG): kubectl and helm are the pinned binaries in .cache/k8s/<v>/bin.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import make_test_models as models  # noqa: E402

LLM_MODEL_DIR = ROOT / ".cache/models/smollm2-135m-instruct-int4"  # make models
LLM_FP32_MODEL_DIR = ROOT / ".cache/models/smollm2-135m-instruct-fp32"  # make models
NODE_IP = "10.88.0.1"  # the bridge address of the local cluster (e2e/cluster/env.sh)
HELLO_IMAGE = "ferrite.local/hello:1"  # tiny static HTTP server and client, imported by up.sh


def k8s_bin() -> Path:
    out = subprocess.run(
        ["bash", str(ROOT / "e2e/build-control-plane.sh"), "--print-bin-dir"],
        capture_output=True, text=True, check=True,
    )
    return Path(out.stdout.strip())


BIN = k8s_bin()
KUBECTL = str(BIN / "kubectl")
HELM = str(BIN / "helm")


def log(message: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def kubectl(*args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> str:
    result = subprocess.run([KUBECTL, *args], capture_output=True, text=True, input=input, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def kubectl_json(*args: str, check: bool = True):
    out = kubectl(*args, "-o", "json", check=check)
    return json.loads(out) if out.strip() else None


def helm(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def apply(namespace: str, manifest: dict) -> None:
    kubectl("-n", namespace, "apply", "-f", "-", input=json.dumps(manifest))


def eventually(what: str, timeout: float, check, interval: float = 0.5):
    """Calls `check` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = check()
            if value:
                return value
        except AssertionError as e:  # kubectl hiccups count as "not yet"
            last_error = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what}" +
                                 (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


def condition(obj: dict, type_: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def model_deployment(name: str, uri: str, **spec) -> dict:
    return {
        "apiVersion": "ferrite.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"uri": uri}, **spec},
    }


def get_mdep(namespace: str, name: str) -> dict:
    return kubectl_json("-n", namespace, "get", "mdep", name)


def wait_ready(namespace: str, name: str, timeout: float = 180) -> float:
    """Waits for the Ready condition; returns the seconds it took."""
    started = time.monotonic()

    def ready():
        md = get_mdep(namespace, name)
        c = condition(md, "Ready")
        return c is not None and c["status"] == "True"

    try:
        eventually(f"ModelDeployment {namespace}/{name} is Ready", timeout, ready)
    except AssertionError:
        dump(namespace)
        raise
    return time.monotonic() - started


def service_ip(namespace: str, name: str) -> str:
    return kubectl("-n", namespace, "get", "svc", name, "-o", "jsonpath={.spec.clusterIP}").strip()


def deployment(namespace: str, name: str) -> dict:
    return kubectl_json("-n", namespace, "get", "deployment", name)


def spec_replicas(namespace: str, name: str) -> int:
    return int(deployment(namespace, name)["spec"].get("replicas", 1))


def ready_replicas(namespace: str, name: str) -> int:
    return int((deployment(namespace, name).get("status") or {}).get("readyReplicas") or 0)


def pods(namespace: str, name: str) -> list[dict]:
    return kubectl_json("-n", namespace, "get", "pods", "-l", f"ferrite.dev/model-deployment={name}")["items"]


def pod(namespace: str, name: str) -> dict:
    return kubectl_json("-n", namespace, "get", "pod", name)


def restart_count(pod: dict) -> int:
    return sum(c.get("restartCount", 0) for c in (pod.get("status") or {}).get("containerStatuses", []))


def kill_container(pod: dict) -> None:
    """SIGKILL the pod's (first) container through the local cluster's
    containerd: a crash, with no chance to clean up, unlike a pod deletion."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    subprocess.run(["bash", "-c", f'source "{ROOT}/e2e/cluster/env.sh" && ctr_ tasks kill -s SIGKILL {container_id}'],
                   check=True, capture_output=True, text=True, timeout=30)


def run_pod(namespace: str, name: str, args: list[str], image: str = HELLO_IMAGE,
            timeout: float = 90) -> tuple[str, str]:
    """Runs a one-shot pod (`image` with `args`, default: the hello client)
    until it ends; returns its phase (Succeeded or Failed) and its log."""
    apply(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                 "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never",
                                 "command": ["/hello"], "args": args}]},
    })
    phase = eventually(f"pod {namespace}/{name} has ended", timeout, lambda: (
        lambda p: p if p in ("Succeeded", "Failed") else None)(
            pod(namespace, name).get("status", {}).get("phase")))
    return phase, kubectl("-n", namespace, "logs", name, check=False)


def pod_metrics(namespace: str, name: str) -> str:
    """The /metrics text of every running pod of ModelDeployment `name`,
    read from the pod IPs (the host reaches them on the bridge)."""
    texts = []
    for p in pods(namespace, name):
        ip = (p.get("status") or {}).get("podIP")
        if ip and not p["metadata"].get("deletionTimestamp"):
            with urllib.request.urlopen(f"http://{ip}:8002/metrics", timeout=10) as response:
                texts.append(response.read().decode())
    return "\n".join(texts)


def metric(text: str, name: str, /, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', series))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


@dataclass
class ChatAnswer:
    """One OpenAI chat completion: HTTP status, headers (lower-cased), body."""

    status: int
    headers: dict[str, str]
    body: dict


def chat(host: str, model: str, prompt: str, headers: dict[str, str] | None = None,
         max_tokens: int = 8, timeout: float = 120) -> ChatAnswer:
    """POST /v1/chat/completions (greedy) to host:8000; HTTP errors are returned, not raised."""
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    request = urllib.request.Request(f"http://{host}:8000/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return ChatAnswer(response.status, {k.lower(): v for k, v in response.headers.items()},
                              json.load(response))
    except urllib.error.HTTPError as e:
        return ChatAnswer(e.code, {k.lower(): v for k, v in e.headers.items()},
                          {"error": e.read()[:500].decode(errors="replace")})


def cluster_env() -> dict[str, str]:
    """The running local cluster's .cache/k8s/cluster/env (e2e/cluster/up.sh)."""
    text = (ROOT / ".cache/k8s/cluster/env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def dns_counters() -> tuple[float, float]:
    """The cluster DNS's queries answered, and queries it sent to the host's
    resolver (connections taken for them: every forwarded query takes one)."""
    with urllib.request.urlopen(cluster_env()["FERRITE_DNS_METRICS_URL"], timeout=10) as response:
        text = response.read().decode()
    forwarded = (metric(text, "coredns_proxy_conn_cache_hits_total")
                 + metric(text, "coredns_proxy_conn_cache_misses_total"))
    return metric(text, "coredns_dns_requests_total"), forwarded


def dump(namespace: str) -> None:
    """What a failing test shows: the objects, events and the operator's recent logs."""
    for args in (["get", "mdep,deploy,rs,pods,svc,pdb", "-o", "wide"], ["get", "mdep", "-o", "yaml"],
                 ["get", "events", "--sort-by=.lastTimestamp"]):
        print(f"--- kubectl -n {namespace} {' '.join(args)}", flush=True)
        print(kubectl("-n", namespace, *args, check=False), flush=True)


class Watch:
    """`kubectl get -w -o json` of one object in the background: every
    version of it the API server reported, with the time it arrived."""

    def __init__(self, namespace: str, kind: str, name: str):
        self.seen: list[tuple[float, dict]] = []
        self.proc = subprocess.Popen(
            [KUBECTL, "-n", namespace, "get", kind, name, "-w", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        decoder = json.JSONDecoder()
        buffer = ""
        for line in self.proc.stdout:
            buffer += line
            while buffer.strip():
                try:
                    obj, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break
                self.seen.append((time.monotonic(), obj))
                buffer = buffer.lstrip()[end:]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ------------------------------------------------------------ model server
class ModelFileServer:
    """Serves a directory over HTTP on the cluster bridge (pods reach the host
    there; a pod's 127.0.0.1 is its own)."""

    def __init__(self, directory: Path, host: str = NODE_IP):
        directory = str(directory)
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=directory, **kwargs)

            def log_message(self, fmt, *args):
                owner.requests.append(fmt % args)

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def mlp_v2_weights() -> dict[str, np.ndarray]:
    return models.mlp_weights(seed=4321)


def make_mlp_with(weights: dict[str, np.ndarray]):
    """The `mlp` test model's graph with other weights (a 'new version')."""
    from onnx import numpy_helper

    model = models.make_mlp()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    return model


def mlp_reference(x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    h = np.maximum(x.astype(np.float32) @ weights["w1"] + weights["b1"], 0.0)
    return (h @ weights["w2"] + weights["b2"]).astype(np.float32)


def write_models(directory: Path) -> None:
    import onnx

    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(models.make_mlp(), directory / "mlp.onnx")
    onnx.save(make_mlp_with(mlp_v2_weights()), directory / "mlp-v2.onnx")
    onnx.save(models.make_slow(models.SLOW_LAYERS), directory / "slow.onnx")
    # Not an ONNX model at all: the server must refuse to load it.
    (directory / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    # The LLM model directory (`make models`) as one archive: HTTP cannot list
    # a directory, so fetch unpacks a .tar instead.
    for model_dir, archive in ((LLM_MODEL_DIR, "smollm2.tar"), (LLM_FP32_MODEL_DIR, "smollm2-fp32.tar")):
        if model_dir.is_dir():
            with tarfile.open(directory / archive, "w") as tar:
                tar.add(model_dir, arcname=model_dir.name,
                        filter=lambda info: None if info.name.rsplit("/", 1)[-1].startswith(".") else info)


# ------------------------------------------------------------ load
@dataclass
class LoadStats:
    ok: int = 0
    failed: int = 0
    # Connections refused before anything was sent (kube-proxy still routed
    # to a pod that stopped listening); retried, so not failed requests.
    connect_retries: int = 0
    # Requests slower than SLOW_REQUEST_S (with when they started).
    slow: list[str] = field(default_factory=list)
    max_latency_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)


CONNECT_TIMEOUT_S = 5
REQUEST_TIMEOUT_S = 60
SLOW_REQUEST_S = 3


class Load:
    """`threads` clients sending KServe v2 JSON requests to host:8000 back to
    back, one TCP connection per request (so kube-proxy spreads them over the
    ready pods). Every answer is checked with `classify(outputs) -> label or
    None` (None: a wrong answer, counted as failed)."""

    def __init__(self, host: str, model: str, inputs: list[dict], classify, threads: int, pause: float = 0.0):
        self.host, self.model, self.classify, self.pause = host, model, classify, pause
        self.body = json.dumps({"inputs": inputs}).encode()
        self.stats = LoadStats()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.started = time.monotonic()
        for t in self.threads:
            t.start()

    def _one(self) -> tuple[str, str]:
        for attempt in range(5):
            conn = http.client.HTTPConnection(self.host, 8000, timeout=CONNECT_TIMEOUT_S)
            try:
                conn.connect()
            except OSError as e:
                # Refused, unreachable or unanswered: nothing was sent, so
                # the request is retried (as gRPC's transparent retry would).
                conn.close()
                with self.lock:
                    self.stats.connect_retries += 1
                    if len(self.stats.errors) < 40:
                        self.stats.errors.append(f"{time.monotonic() - self.started:.1f}s connect: {e!r} (retried)")
                time.sleep(0.1 * (attempt + 1))
                last = e
                continue
            conn.sock.settimeout(REQUEST_TIMEOUT_S)
            try:
                conn.request("POST", f"/v2/models/{self.model}/infer", body=self.body,
                             headers={"Content-Type": "application/json", "Connection": "close"})
                response = conn.getresponse()
                data = response.read()
                if response.status != 200:
                    return "failed", f"HTTP {response.status}: {data[:200]!r}"
                label = self.classify(json.loads(data)["outputs"])
                return ("ok", label) if label else ("failed", f"wrong answer: {data[:200]!r}")
            except Exception as e:  # noqa: BLE001 - every failure counts
                return "failed", f"{type(e).__name__}: {e}"
            finally:
                conn.close()
        return "failed", f"connection refused 5 times: {last}"

    def _run(self):
        while not self.stopping.is_set():
            t0 = time.monotonic()
            outcome, detail = self._one()
            took = time.monotonic() - t0
            with self.lock:
                self.stats.max_latency_s = max(self.stats.max_latency_s, round(took, 2))
                if took > SLOW_REQUEST_S and len(self.stats.slow) < 20:
                    self.stats.slow.append(f"started {t0 - self.started:.1f}s took {took:.1f}s")
                if outcome == "ok":
                    self.stats.ok += 1
                    self.stats.answers[detail] = self.stats.answers.get(detail, 0) + 1
                else:
                    self.stats.failed += 1
                    if len(self.stats.errors) < 40:
                        self.stats.errors.append(f"{time.monotonic() - self.started:.1f}s {detail}")
            if self.pause:
                time.sleep(self.pause)

    def stop(self) -> LoadStats:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=90)
        return self.stats


SLOW_INPUT = [float(i % 7) / 7 for i in range(models.SLOW_WIDTH)]


def slow_load(host: str, threads: int) -> Load:
    expected = np.array(SLOW_INPUT, np.float32)

    def classify(outputs):
        got = np.array(outputs[0]["data"], np.float32)
        return "slow" if np.allclose(got, expected, atol=1e-6) else None

    return Load(host, "slow", [{"name": "INPUT0", "shape": [1, models.SLOW_WIDTH], "datatype": "FP32",
                                "data": SLOW_INPUT}], classify, threads)


MLP_INPUT = np.random.default_rng(11).standard_normal((1, models.MLP_IN)).astype(np.float32)


def mlp_load(host: str, threads: int, pause: float = 0.0) -> Load:
    """Answers are labelled v1 or v2 by which weights produced them."""
    refs = {"v1": mlp_reference(MLP_INPUT, models.mlp_weights()), "v2": mlp_reference(MLP_INPUT, mlp_v2_weights())}

    def classify(outputs):
        got = np.array(outputs[0]["data"], np.float32).reshape(1, -1)
        for label, ref in refs.items():
            if np.allclose(got, ref, rtol=1e-4, atol=1e-4):
                return label
        return None

    return Load(host, "mlp", [{"name": "INPUT0", "shape": [1, models.MLP_IN], "datatype": "FP32",
                               "data": MLP_INPUT.ravel().tolist()}], classify, threads, pause)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
