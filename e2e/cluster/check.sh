#!/usr/bin/env bash
# Smoke check of the running local cluster (e2e/cluster/up.sh):
#   1. a Deployment of 2 `hello` pods (static Go HTTP server, local image) and
#      a Service become Ready; the pods have IPs in the node's pod CIDR, on the
#      bridge (one veth each);
#   2. the Service's ClusterIP, curled from the host, reaches both pods;
#   3. from inside a pod: the ClusterIP answers, and the API server answers
#      through the `kubernetes` Service with the pod's ServiceAccount token;
#   4. `kubectl logs` and `kubectl exec` work (apiserver -> kubelet);
#   5. a pod cannot reach an address outside this machine (198.51.100.1,
#      TEST-NET-2): dropped by the cluster's FORWARD rule, counted there;
#   6. cluster DNS: a pod reaches the Service by the names `hello`,
#      `hello.<ns>.svc` and `hello.<ns>.svc.cluster.local`; a missing name in
#      cluster.local is NXDOMAIN (answered by CoreDNS, nothing forwarded).
# Removes its namespace at the end. Exit status 0 only if all pass.
#   e2e/cluster/check.sh [--keep]
set -euo pipefail
T0=$SECONDS
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
KEEP=0; [[ "${1:-}" == --keep ]] && KEEP=1
export KUBECONFIG="$OUT_DIR/kubeconfig"
[[ -f "$KUBECONFIG" ]] || die "no cluster running (no $KUBECONFIG); run e2e/cluster/up.sh"
k() { "$K8S_BIN/kubectl" "$@"; }
NS=ferrite-check
fail() { echo "FAIL: $*" >&2; k -n "$NS" get all -o wide >&2 || true; exit 1; }
cleanup() { ((KEEP)) || k delete namespace "$NS" --wait=false >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "1. Deployment hello (2 replicas) + Service"
# a namespace left by an earlier run (--keep, or still terminating): gone first
k delete namespace "$NS" --ignore-not-found --wait=true --timeout=90s >/dev/null
k create namespace "$NS" >/dev/null
k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello}
spec:
  replicas: 2
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      automountServiceAccountToken: false
      securityContext: {runAsNonRoot: true, runAsUser: 65532}
      containers:
      - name: hello
        image: $HELLO_IMAGE
        imagePullPolicy: Never
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /healthz, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  selector: {app: hello}
  ports: [{port: 80, targetPort: 8080}]
EOF
k -n "$NS" rollout status deploy/hello --timeout=90s >&2 || fail "rollout"
mapfile -t ips < <(k -n "$NS" get pods -l app=hello -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}')
((${#ips[@]} == 2)) || fail "expected 2 pod IPs, got ${ips[*]}"
prefix="${NODE_POD_CIDR%.*}."
for ip in "${ips[@]}"; do [[ "$ip" == "$prefix"* ]] || fail "pod IP $ip not in $NODE_POD_CIDR"; done
veths="$(ip -o link show master "$BRIDGE" | wc -l)"
((veths >= 2)) || fail "expected >= 2 veths on $BRIDGE, got $veths"
step "   pods ${ips[*]} on $BRIDGE ($veths veths)"

step "2. ClusterIP from the host"
svc="$(k -n "$NS" get svc hello -o jsonpath='{.spec.clusterIP}')"
declare -A seen=()
# kube-proxy adds each endpoint within about a second of its pod turning
# Ready: keep asking for up to 20 s, not a fixed number of times.
deadline=$((SECONDS + 20))
while ((${#seen[@]} < 2 && SECONDS < deadline)); do
  r="$(curl -fs --max-time 2 "http://$svc/" || true)"
  [[ -n "$r" ]] && seen["$(awk '{print $3}' <<<"$r")"]=1
  sleep 0.1
done
((${#seen[@]} == 2)) || fail "ClusterIP $svc reached ${#seen[@]} pod(s): ${!seen[*]}"
step "   http://$svc/ reached both pods: ${!seen[*]}"

# run_pod NAME ARGS...: a one-shot pod running /hello ARGS; prints its log,
# returns 0 if it Succeeded.
run_pod() {
  local name="$1"; shift
  local args; args="$(printf '"%s",' "$@")"; args="[${args%,}]"
  k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name}
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 65532}
  containers:
  - name: c
    image: $HELLO_IMAGE
    imagePullPolicy: Never
    command: ["/hello"]
    args: $args
EOF
  local phase deadline=$((SECONDS + 60))
  while :; do
    phase="$(k -n "$NS" get pod "$name" -o jsonpath='{.status.phase}')"
    [[ "$phase" == Succeeded || "$phase" == Failed ]] && break
    ((SECONDS < deadline)) || { echo "pod $name still $phase" >&2; return 1; }
    sleep 0.5
  done
  k -n "$NS" logs "$name" 2>&1 | cut -c1-100 | sed 's/^/     | /' >&2
  [[ "$phase" == Succeeded ]]
}

step "3. from a pod: ClusterIP, and the API server through the kubernetes Service"
run_pod to-svc -get "http://$svc/" || fail "pod -> ClusterIP $svc"
k -n "$NS" create rolebinding sa-view --clusterrole=view --serviceaccount="$NS:default" >/dev/null
run_pod to-api -sa -get "https://$KUBERNETES_SVC_IP/api/v1/namespaces/$NS/services/hello" >/dev/null \
  || fail "pod -> https://$KUBERNETES_SVC_IP (ServiceAccount token)"
step "   both answered"

step "4. kubectl logs / exec"
pod="$(k -n "$NS" get pods -l app=hello -o jsonpath='{.items[0].metadata.name}')"
k -n "$NS" logs "$pod" | grep -q listening || fail "kubectl logs $pod"
out="$(k -n "$NS" exec "$pod" -- /hello -get http://127.0.0.1:8080/healthz)" && [[ "$out" == ok ]] || fail "kubectl exec $pod: $out"
step "   ok"

step "5. no way out: a pod's request to 198.51.100.1 is dropped on this machine"
drops() { iptables -w -t filter -L FERRITE-FORWARD -v -x -n 2>/dev/null | awk '/pods stay on this machine/ { print $1 }'; }
d0="$(drops)"
if run_pod to-outside -timeout 2s -get http://198.51.100.1/ 2>/dev/null; then fail "a pod reached 198.51.100.1"; fi
d1="$(drops)"
((d1 > d0)) || fail "the request did not hit the FORWARD drop rule ($d0 -> $d1 packets)"
step "   refused: $((d1 - d0)) packet(s) dropped by FERRITE-FORWARD"

step "6. cluster DNS ($DNS_IP): a pod reaches the Service by its names"
for name in hello "hello.$NS.svc" "hello.$NS.svc.$CLUSTER_DOMAIN"; do
  pod="dns-$(tr . - <<<"$name" | cut -c1-40)"
  run_pod "$pod" -get "http://$name/" || fail "pod -> http://$name/ (cluster DNS)"
  # the Service answered: "hello from <pod> ..."
  k -n "$NS" logs "$pod" | grep -q '^hello from hello-' || fail "http://$name/ answered something else"
done
# A name in the cluster domain that does not exist: CoreDNS answers for the
# zone itself (NXDOMAIN, Go says "no such host"), no timeout.
if run_pod dns-missing -get "http://nosuch.$NS.svc.$CLUSTER_DOMAIN./"; then fail "nosuch.$NS.svc resolved"; fi
out="$(k -n "$NS" logs dns-missing 2>&1)"
grep -q 'no such host' <<<"$out" || fail "nosuch.$NS.svc: expected NXDOMAIN (no such host), got: $out"
step "   hello, hello.$NS.svc, hello.$NS.svc.$CLUSTER_DOMAIN answered; a missing name is NXDOMAIN"

step "all checks passed"
