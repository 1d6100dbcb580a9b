#!/usr/bin/env bash
# The demo (`make demo`, the README's first command; `make demo-down` undoes it):
#   1. the local single-node cluster (e2e/cluster/up.sh), or with
#      USE_CURRENT_CONTEXT=1 the cluster of the current kubeconfig;
#   2. the ferrite images imported into the local cluster's containerd;
#   3. the operator installed with Helm (release ferrite, namespace ferrite-system);
#   4. an example ModelDeployment (the server's demo iris classifier, fetched
#      over HTTP from a file server on the cluster bridge) in namespace ferrite-demo;
#   5. wait until it is Ready, send inferences with tritonclient through its
#      Service, and print what happened.
#
#   e2e/demo.sh          # run the demo
#   e2e/demo.sh down     # remove it (and stop the cluster if the demo started it)
#
# USE_CURRENT_CONTEXT=1: the images must be pullable by that cluster (set
# IMAGE_REGISTRY / SERVER_IMAGE_REPO / OPERATOR_IMAGE_REPO) and the model must be at a
# URI its pods can reach (DEMO_MODEL_URI); inference goes through `kubectl port-forward`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
K8S_BIN="${K8S_BIN:-$(e2e/build-control-plane.sh --print-bin-dir)}"
KUBECTL="$K8S_BIN/kubectl"
HELM="$K8S_BIN/helm"
PY="$ROOT/.venv/bin/python"
STATE="$ROOT/.cache/demo"
RELEASE=ferrite
RELEASE_NS=ferrite-system
NS=ferrite-demo
NODE_IP=10.88.0.1
MODEL_PORT="${DEMO_MODEL_PORT:-18081}"
USE_CURRENT_CONTEXT="${USE_CURRENT_CONTEXT:-0}"
T0=$SECONDS
say() { printf '\n==> [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
mkdir -p "$STATE"

stop_model_server() {
  if [[ -f "$STATE/model-server.pid" ]]; then
    kill "$(cat "$STATE/model-server.pid")" 2>/dev/null || true
    rm -f "$STATE/model-server.pid"
  fi
}

if [[ "${1:-}" == down ]]; then
  if [[ "$USE_CURRENT_CONTEXT" != 1 ]]; then export KUBECONFIG="$ROOT/.cache/k8s/cluster/kubeconfig"; fi
  if [[ "$USE_CURRENT_CONTEXT" == 1 || -f "${KUBECONFIG:-/nonexistent}" ]]; then
    say "removing the demo ModelDeployment, its namespace and the Helm release"
    "$KUBECTL" delete namespace "$NS" --ignore-not-found --wait=true --timeout=120s || true
    "$HELM" uninstall "$RELEASE" -n "$RELEASE_NS" --wait --timeout 120s 2>/dev/null || true
    "$KUBECTL" delete namespace "$RELEASE_NS" --ignore-not-found --wait=true --timeout=120s || true
  fi
  stop_model_server
  if [[ -f "$STATE/cluster-started-by-demo" ]]; then
    say "stopping the local cluster the demo started"
    e2e/cluster/down.sh
    rm -f "$STATE/cluster-started-by-demo"
  fi
  say "demo removed"
  exit 0
fi

# ---------------------------------------------------------------- cluster
if [[ "$USE_CURRENT_CONTEXT" == 1 ]]; then
  say "using the cluster of the current kubeconfig: $("$KUBECTL" config current-context)"
  "$KUBECTL" get nodes
else
  export KUBECONFIG="$ROOT/.cache/k8s/cluster/kubeconfig"
  if [[ -f "$KUBECONFIG" ]] && "$KUBECTL" get --raw /readyz >/dev/null 2>&1; then
    say "the local cluster is already running"
  else
    if [[ $EUID -ne 0 ]]; then
      echo "The local cluster needs root (containerd, kubelet, iptables, the bridge). Run as root," >&2
      echo "or USE_CURRENT_CONTEXT=1 for the cluster of your kubeconfig, or 'make demo-local' for no cluster." >&2
      exit 1
    fi
    say "starting the local single-node cluster (e2e/cluster/up.sh)"
    t=$SECONDS
    e2e/cluster/up.sh
    touch "$STATE/cluster-started-by-demo"
    CLUSTER_START_S=$((SECONDS - t))
  fi
  say "importing the images into the cluster's containerd"
  e2e/cluster/load-image.sh .cache/images/ferrite-server.oci.tar .cache/images/ferrite-operator.oci.tar
fi

# ---------------------------------------------------------------- operator
say "installing the operator with Helm (release $RELEASE in $RELEASE_NS)"
helm_args=(--set image.pullPolicy=IfNotPresent --set serverImage.pullPolicy=IfNotPresent --set logFormat=text)
[[ -n "${OPERATOR_IMAGE_REPO:-}" ]] && helm_args+=(--set "image.repository=$OPERATOR_IMAGE_REPO")
[[ -n "${SERVER_IMAGE_REPO:-}" ]] && helm_args+=(--set "serverImage.repository=$SERVER_IMAGE_REPO")
t=$SECONDS
"$HELM" upgrade --install "$RELEASE" charts/ferrite -n "$RELEASE_NS" --create-namespace "${helm_args[@]}" \
  --wait --timeout 180s
HELM_S=$((SECONDS - t))
"$KUBECTL" -n "$RELEASE_NS" get pods -o wide

# ---------------------------------------------------------------- model
if [[ -z "${DEMO_MODEL_URI:-}" ]]; then
  [[ "$USE_CURRENT_CONTEXT" == 1 ]] && { echo "USE_CURRENT_CONTEXT=1 needs DEMO_MODEL_URI (a URI the cluster's pods can fetch)" >&2; exit 1; }
  stop_model_server
  mkdir -p "$STATE/models"
  cp server/assets/demo.onnx "$STATE/models/demo.onnx"
  say "serving the demo model at http://$NODE_IP:$MODEL_PORT/demo.onnx (pods reach the host on the bridge)"
  (cd "$STATE/models" && exec "$PY" -m http.server "$MODEL_PORT" --bind "$NODE_IP") >"$STATE/model-server.log" 2>&1 &
  echo $! >"$STATE/model-server.pid"
  for _ in $(seq 50); do curl -sf -o /dev/null "http://$NODE_IP:$MODEL_PORT/demo.onnx" && break; sleep 0.2; done
  DEMO_MODEL_URI="http://$NODE_IP:$MODEL_PORT/demo.onnx"
fi

say "applying the ModelDeployment 'demo' in namespace $NS"
"$KUBECTL" create namespace "$NS" --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
t=$SECONDS
"$KUBECTL" -n "$NS" apply -f - <<EOF
apiVersion: ferrite.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: demo
spec:
  model:
    uri: $DEMO_MODEL_URI
  runtime:
    intraOpThreads: 1
  batching:
    maxBatchSize: 8
  autoscaling:
    minReplicas: 1
    maxReplicas: 3
    targetQueueDepth: 8
    scaleDownStabilizationSeconds: 60
EOF
say "waiting until it is Ready"
if ! "$KUBECTL" -n "$NS" wait mdep/demo --for=condition=Ready --timeout=180s; then
  "$KUBECTL" -n "$NS" get mdep,pods -o wide; "$KUBECTL" -n "$NS" get mdep demo -o yaml; exit 1
fi
READY_S=$((SECONDS - t))
"$KUBECTL" -n "$NS" get mdep,deploy,pods,svc -o wide

# ---------------------------------------------------------------- inference
PF_PID=
if [[ "$USE_CURRENT_CONTEXT" == 1 ]]; then
  "$KUBECTL" -n "$NS" port-forward svc/demo 18000:8000 18001:8001 >/dev/null 2>&1 &
  PF_PID=$!
  trap '[[ -n "$PF_PID" ]] && kill "$PF_PID" 2>/dev/null' EXIT
  sleep 2
  HTTP_ADDR=127.0.0.1:18000 GRPC_ADDR=127.0.0.1:18001
else
  IP=$("$KUBECTL" -n "$NS" get svc demo -o jsonpath='{.spec.clusterIP}')
  HTTP_ADDR=$IP:8000 GRPC_ADDR=$IP:8001
fi
say "inference with tritonclient through the Service (gRPC $GRPC_ADDR, HTTP $HTTP_ADDR)"
"$PY" - "$GRPC_ADDR" "$HTTP_ADDR" <<'EOF'
import sys
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

grpc_addr, http_addr = sys.argv[1:3]
grpc = grpcclient.InferenceServerClient(grpc_addr)
meta = grpc.get_model_metadata("demo", as_json=True)
print(f"model 'demo': inputs {meta['inputs']}, outputs {meta['outputs']}")
flowers = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
x = grpcclient.InferInput("input", list(flowers.shape), "FP32"); x.set_data_from_numpy(flowers)
result = grpc.infer("demo", [x]).as_numpy("probabilities")
print(f"gRPC ModelInfer: {flowers.tolist()} -> probabilities {np.round(result, 4).tolist()}")
http = httpclient.InferenceServerClient(http_addr)
x = httpclient.InferInput("input", list(flowers.shape), "FP32"); x.set_data_from_numpy(flowers)
same = np.allclose(result, http.infer("demo", [x]).as_numpy("probabilities"))
print(f"HTTP infer gives the same answer: {same}")
for _ in range(50):
    x = grpcclient.InferInput("input", list(flowers.shape), "FP32"); x.set_data_from_numpy(flowers)
    grpc.infer("demo", [x])
stats = grpc.get_inference_statistics("demo", as_json=True)["model_stats"][0]
print(f"statistics of the replica that answered: {stats.get('inference_count', 0)} inferences")
sys.exit(0 if same else 1)
EOF

say "what happened"
"$KUBECTL" -n "$NS" get mdep demo
"$KUBECTL" -n "$NS" get mdep demo -o jsonpath='{range .status.conditions[*]}  {.type}={.status} ({.reason}): {.message}{"\n"}{end}'
"$KUBECTL" -n "$NS" get events --sort-by=.lastTimestamp | tail -n 15
echo
echo "cluster start: ${CLUSTER_START_S:-already running}${CLUSTER_START_S:+ s}; helm install to operator ready: ${HELM_S} s; kubectl apply to Ready: ${READY_S} s"
echo "try it:  export KUBECONFIG=${KUBECONFIG:-~/.kube/config}; $KUBECTL -n $NS get mdep demo -w"
echo "remove:  make demo-down"
