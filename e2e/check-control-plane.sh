#!/usr/bin/env bash
# Smoke check of the local control plane: start etcd + kube-apiserver +
# kube-controller-manager, then check that
#   1. `kubectl get ns` answers,
#   2. a Deployment gets a ReplicaSet (deployment controller) and the
#      ReplicaSet its pods (replicaset + serviceaccount controllers; no
#      scheduler runs, so the pods stay Pending),
#   3. deleting an owner garbage-collects its dependent (ownerReferences),
#      and deleting the Deployment collects its ReplicaSet and pods.
# Stops everything at the end (also on failure).
set -euo pipefail
E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_BIN="$("$E2E_DIR/build-control-plane.sh" --print-bin-dir)"
"$E2E_DIR/build-control-plane.sh" etcd kube-apiserver kube-controller-manager kubectl

out="$("$E2E_DIR/start-apiserver.sh" start --controller-manager)"
STATE="$(sed -n 's/^STATE_DIR=//p' <<<"$out")"
trap '"$E2E_DIR/start-apiserver.sh" stop "$STATE"' EXIT
export KUBECONFIG="$STATE/kubeconfig"
k() { "$K8S_BIN/kubectl" "$@"; }

# until SECONDS CMD...: retry CMD until it succeeds
until_ok() {
  local t=$1; shift
  local deadline=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { echo "FAIL: timed out: $*" >&2; return 1; }
    sleep 0.5
  done
}
pass() { echo "PASS: $*"; }

k get ns
k get ns default >/dev/null && pass "kubectl get ns"

k apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: registry.invalid/web:1}]
EOF
has_rs() { [[ "$(k get rs -l app=web -o jsonpath='{.items[0].metadata.ownerReferences[0].name}')" == web ]]; }
until_ok 60 has_rs
pass "Deployment -> ReplicaSet $(k get rs -l app=web -o name)"
two_pods() { [[ "$(k get pods -l app=web -o name | wc -l)" == 2 ]]; }
until_ok 60 two_pods
pass "ReplicaSet -> 2 pods (Pending: no scheduler)"

k create configmap owner
uid="$(k get configmap owner -o jsonpath='{.metadata.uid}')"
k apply -f - <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: dependent
  ownerReferences: [{apiVersion: v1, kind: ConfigMap, name: owner, uid: "$uid"}]
EOF
k delete configmap owner
gone() { ! k get "$@" >/dev/null 2>&1; }
until_ok 60 gone configmap dependent
pass "owner deleted -> dependent garbage-collected"

k delete deployment web
no_rs() { [[ -z "$(k get rs,pods -l app=web -o name)" ]]; }
until_ok 60 no_rs
pass "Deployment deleted -> ReplicaSet and pods garbage-collected"
echo "all control-plane checks passed"
