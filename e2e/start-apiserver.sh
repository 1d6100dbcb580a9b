#!/usr/bin/env bash
# Start a real control plane on loopback: etcd + kube-apiserver (+ optionally
# kube-controller-manager), from the binaries that build-control-plane.sh puts in
# .cache/k8s/<version>/bin. For manual checks, and the reference that the Rust
# test harness follows.
#
#   e2e/start-apiserver.sh start [--controller-manager]   prints the state dir and
#                                                          the kubeconfig path
#   e2e/start-apiserver.sh stop [STATE_DIR]               stops what start started,
#                                                          removes STATE_DIR
#   e2e/start-apiserver.sh env [STATE_DIR]                KUBECONFIG=... for `eval`
#
# STATE_DIR defaults to the last one started (recorded in .cache/k8s/current).
# K8S_BIN overrides the binary dir. Everything listens on 127.0.0.1 only, on
# free ports; etcd keeps its data in STATE_DIR (nothing outside it is written
# except the `current` pointer). Certificates come from `openssl` (3.x):
#
#   ca.{crt,key}          EC P-256 CA; signs every cert below, is --client-ca-file
#   apiserver.{crt,key}   serving cert: SAN IP 127.0.0.1, 10.0.0.1, DNS localhost,
#                         kubernetes, kubernetes.default(.svc(.cluster.local))
#   admin.{crt,key}       client cert CN=ferrite-admin O=system:masters
#   front-proxy-client.{crt,key}  the aggregator's client cert (--proxy-client-*);
#                         ca.crt doubles as --requestheader-client-ca-file
#   sa.{key,pub}          service-account token signing key pair
#   token                 a bearer token for user ferrite-admin (system:masters),
#                         accepted through --token-auth-file=tokens.csv
#   kubeconfig            cluster (CA + https://127.0.0.1:PORT), user = admin cert
#   ports                 ETCD_PORT, ETCD_PEER_PORT, APISERVER_PORT, KCM_PORT
set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$E2E_DIR/.." && pwd)"
K8S_BIN="${K8S_BIN:-$("$E2E_DIR/build-control-plane.sh" --print-bin-dir)}"
CURRENT="$ROOT/.cache/k8s/current"
READY_TIMEOUT="${READY_TIMEOUT:-60}"

# log, die, alive, free_port, wait_http, spawn, stop_pid, cert_ca, cert_leaf
source "$E2E_DIR/lib.sh"

gen_certs() {
  local d="$1"
  cert_ca "$d" 7
  cert_leaf "$d" 7 apiserver "/CN=kube-apiserver" \
    "$(cert_server_ext "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")"
  cert_leaf "$d" 7 admin "/O=system:masters/CN=ferrite-admin" "$CERT_CLIENT"
  # the aggregation layer's proxy client (--requestheader-*, --proxy-client-*);
  # without it the controller manager's delegated authn logs errors endlessly
  cert_leaf "$d" 7 front-proxy-client "/CN=front-proxy-client" "$CERT_CLIENT"
  (
    cd "$d"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
    openssl rand -hex 24 > token
    echo "$(cat token),ferrite-admin,ferrite-admin,system:masters" > tokens.csv
    chmod 600 ./*.key token tokens.csv
  )
}

write_kubeconfig() { # FILE PORT
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ferrite-e2e
  cluster:
    server: https://127.0.0.1:$2
    certificate-authority: $STATE/ca.crt
users:
- name: ferrite-admin
  user:
    client-certificate: $STATE/admin.crt
    client-key: $STATE/admin.key
contexts:
- name: ferrite-e2e
  context: {cluster: ferrite-e2e, user: ferrite-admin}
current-context: ferrite-e2e
EOF
}

# wait_http NAME URL [curl args...]: until it answers 200 or the process dies.
wait_http() {
  local name="$1" url="$2"; shift 2
  local pid; pid="$(cat "$STATE/$name.pid")"
  local deadline=$((SECONDS + READY_TIMEOUT))
  until curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$STATE/$name.log" >&2; die "$name exited; log: $STATE/$name.log"; }
    ((SECONDS < deadline)) || { tail -n 30 "$STATE/$name.log" >&2; die "$name not ready after ${READY_TIMEOUT}s"; }
    sleep 0.2
  done
}

spawn() { # NAME ARGS...
  local name="$1"; shift
  nohup "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

cmd_start() {
  local with_kcm=0
  for a in "$@"; do
    case "$a" in
      --controller-manager|--kcm) with_kcm=1 ;;
      *) die "unknown option $a" ;;
    esac
  done
  for b in etcd kube-apiserver; do
    [[ -x "$K8S_BIN/$b" ]] || die "$K8S_BIN/$b missing; run e2e/build-control-plane.sh"
  done
  ((with_kcm == 0)) || [[ -x "$K8S_BIN/kube-controller-manager" ]] \
    || die "$K8S_BIN/kube-controller-manager missing; run e2e/build-control-plane.sh"

  STATE="$(mktemp -d "${TMPDIR:-/tmp}/ferrite-cp.XXXXXX")"
  mkdir -p "$(dirname "$CURRENT")"; echo "$STATE" >"$CURRENT"
  # On any failure (set -e, die), stop what was started and remove the dir.
  trap 'rc=$?; if ((rc != 0)); then echo "start failed; cleaning up $STATE" >&2; cmd_stop "$STATE"; fi' EXIT
  local t0=$SECONDS
  gen_certs "$STATE"
  : >"$STATE/ports"
  local etcd_port etcd_peer api_port
  etcd_port="$(free_port)"; echo "ETCD_PORT=$etcd_port" >>"$STATE/ports"
  etcd_peer="$(free_port)"; echo "ETCD_PEER_PORT=$etcd_peer" >>"$STATE/ports"
  api_port="$(free_port)";  echo "APISERVER_PORT=$api_port" >>"$STATE/ports"

  # etcd: plain HTTP on loopback (as envtest does), throwaway data, no fsync.
  spawn etcd "$K8S_BIN/etcd" \
    --name=default \
    --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-cluster="default=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync=true \
    --log-level=warn
  wait_http etcd "http://127.0.0.1:$etcd_port/health"
  log "etcd ready on 127.0.0.1:$etcd_port"

  spawn kube-apiserver "$K8S_BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --secure-port="$api_port" \
    --cert-dir="$STATE/apiserver-certs" \
    --tls-cert-file="$STATE/apiserver.crt" \
    --tls-private-key-file="$STATE/apiserver.key" \
    --client-ca-file="$STATE/ca.crt" \
    --token-auth-file="$STATE/tokens.csv" \
    --requestheader-client-ca-file="$STATE/ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$STATE/front-proxy-client.crt" \
    --proxy-client-key-file="$STATE/front-proxy-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$STATE/sa.pub" \
    --service-account-signing-key-file="$STATE/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --authorization-mode=RBAC \
    --allow-privileged=true \
    --profiling=false \
    --v=1
  write_kubeconfig "$STATE/kubeconfig" "$api_port"
  wait_http kube-apiserver "https://127.0.0.1:$api_port/readyz" \
    --cacert "$STATE/ca.crt" --cert "$STATE/admin.crt" --key "$STATE/admin.key"
  log "kube-apiserver ready on https://127.0.0.1:$api_port"

  if ((with_kcm)); then
    local kcm_port; kcm_port="$(free_port)"; echo "KCM_PORT=$kcm_port" >>"$STATE/ports"
    spawn kube-controller-manager "$K8S_BIN/kube-controller-manager" \
      --kubeconfig="$STATE/kubeconfig" \
      --authentication-kubeconfig="$STATE/kubeconfig" \
      --authorization-kubeconfig="$STATE/kubeconfig" \
      --bind-address=127.0.0.1 \
      --secure-port="$kcm_port" \
      --cert-dir="$STATE/kcm-certs" \
      --controllers='*' \
      --leader-elect=false \
      --service-account-private-key-file="$STATE/sa.key" \
      --root-ca-file="$STATE/ca.crt" \
      --cluster-signing-cert-file="$STATE/ca.crt" \
      --cluster-signing-key-file="$STATE/ca.key" \
      --profiling=false \
      --v=1
    wait_http kube-controller-manager "https://127.0.0.1:$kcm_port/healthz" --insecure
    log "kube-controller-manager ready (healthz on 127.0.0.1:$kcm_port)"
  fi
  trap - EXIT
  log "control plane up in $((SECONDS - t0))s; state in $STATE"
  echo "STATE_DIR=$STATE"
  echo "KUBECONFIG=$STATE/kubeconfig"
}

cmd_stop() {
  local dir="${1:-}"
  [[ -n "$dir" ]] || dir="$(cat "$CURRENT" 2>/dev/null || true)"
  [[ -n "$dir" && -d "$dir" ]] || { log "nothing to stop"; return 0; }
  [[ "$(basename "$dir")" == ferrite-cp.* ]] || die "$dir is not a state dir of this script"
  # reverse start order: controller manager, apiserver, etcd
  local name pid
  for name in kube-controller-manager kube-apiserver etcd; do
    [[ -f "$dir/$name.pid" ]] || continue
    pid="$(cat "$dir/$name.pid")"
    stop_pid "$pid" 10
  done
  rm -rf "$dir"
  [[ "$(cat "$CURRENT" 2>/dev/null || true)" != "$dir" ]] || rm -f "$CURRENT"
  log "stopped; removed $dir"
}

cmd_env() {
  local dir="${1:-$(cat "$CURRENT" 2>/dev/null || true)}"
  [[ -f "$dir/kubeconfig" ]] || die "no running control plane"
  echo "export KUBECONFIG=$dir/kubeconfig"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop)  shift; cmd_stop "$@" ;;
  env)   shift; cmd_env "$@" ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 2 ;;
esac
