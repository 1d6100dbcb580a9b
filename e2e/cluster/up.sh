#!/usr/bin/env bash
# Start a single-node Kubernetes cluster on this machine, without Docker:
# containerd + runc + CNI bridge from Debian, etcd and the Kubernetes components
# built from pinned Go modules (e2e/build-control-plane.sh). Needs root.
#
#   e2e/cluster/up.sh      prints the kubeconfig path on stdout (progress on stderr)
#   e2e/cluster/down.sh    stops it and undoes everything up.sh did
#
# Idempotent: when the cluster already runs and its node is Ready, up.sh prints
# the kubeconfig and exits; a half-started or crashed one is torn down first.
# On failure it tears down what it started (KEEP_ON_FAILURE=1 keeps it for a look).
#
# Network (see e2e/cluster/README.md): bridge ferrite0 10.88.0.1/24 (pods
# 10.88.0.0/24 of cluster CIDR 10.88.0.0/16), services 10.96.0.0/16 routed onto
# the bridge; the apiserver (6443) and kubelet (10250) listen on 10.88.0.1 only,
# everything else on 127.0.0.1. Pods cannot reach beyond this machine: forwarding
# out of (or into) the bridge from any other interface is dropped, nothing is
# masqueraded to the outside. Cluster DNS: CoreDNS (built from its Go module)
# as a host process on 10.88.0.1:53, the kubelet's clusterDNS; names outside
# cluster.local get SERVFAIL (FERRITE_CLUSTER_DNS_FORWARD=1: the host's resolver). iptables rules are
# only added (chains KUBE-*, CNI-*, FERRITE-*), never flushed; down.sh removes
# exactly those and checks the rules from before are intact.
set -euo pipefail
T0=$SECONDS
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"

READY_TIMEOUT="${READY_TIMEOUT:-90}"
[[ $EUID -eq 0 ]] || die "run as root (containerd, kubelet, iptables and the bridge need it)"
mkdir -p "$(dirname "$LOCK_FILE")" "$OUT_DIR"
exec 8>"$LOCK_FILE"
flock -n 8 || { log "another up.sh/down.sh holds $LOCK_FILE; waiting"; flock 8; }

running() { # every recorded process alive and the apiserver answering
  local n
  for n in "${PROCS[@]}"; do
    alive "$(cat "$STATE/$n.pid" 2>/dev/null)" || return 1
  done
  ctr_ version >/dev/null 2>&1 && kubectl_ get --raw=/readyz >/dev/null 2>&1
}
if [[ -d "$STATE" ]]; then
  if running && kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True; then
    step "cluster already running"
    echo "$OUT_DIR/kubeconfig"
    exit 0
  fi
  step "stale cluster state in $STATE: tearing it down first"
  FERRITE_CLUSTER_LOCKED=1 "$CLUSTER_LIB_DIR/down.sh" >&2
fi

# ---------------------------------------------------------------- packages
need_pkgs=()
for p in containerd runc containernetworking-plugins iptables conntrack; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  step "installing ${need_pkgs[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's postinst must not start a system containerd: ours has its own config.
  policy_rc=/usr/sbin/policy-rc.d; made_policy=0
  if [[ ! -e $policy_rc ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy_rc"; chmod +x "$policy_rc"; made_policy=1; fi
  { apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2 \
    || { apt-get update >&2 && apt-get install -y --no-install-recommends "${need_pkgs[@]}" >&2; }; } \
    || { ((made_policy)) && rm -f "$policy_rc"; die "apt-get install ${need_pkgs[*]} failed"; }
  ((made_policy)) && rm -f "$policy_rc"
fi
for c in containerd containerd-shim-runc-v2 runc ctr iptables iptables-save iptables-restore ip6tables-save conntrack openssl gcc python3 curl ip; do
  command -v "$c" >/dev/null || die "$c not found"
done
[[ -x "$CNI_BIN_DIR/bridge" && -x "$CNI_BIN_DIR/host-local" && -x "$CNI_BIN_DIR/loopback" && -x "$CNI_BIN_DIR/portmap" ]] \
  || die "CNI plugins missing in $CNI_BIN_DIR (package containernetworking-plugins)"

# ---------------------------------------------------------------- binaries
missing=()
for b in "${CLUSTER_BINS[@]}"; do [[ -x "$K8S_BIN/$b" ]] || missing+=("$b"); done
if ((${#missing[@]})); then
  step "building ${missing[*]} (e2e/build-control-plane.sh)"
  "$E2E_DIR/build-control-plane.sh" "${missing[@]}" >&2
fi

# ---------------------------------------------------------------- preflight
step "preflight"
grep -q overlay /proc/filesystems || die "the kernel has no overlay filesystem (containerd's snapshotter needs it)"
[[ -d /sys/fs/cgroup/memory || "$(stat -fc %T /sys/fs/cgroup)" == cgroup2fs ]] || die "no memory cgroup controller mounted"
[[ -e /dev/kmsg ]] || die "/dev/kmsg missing: the kubelet's OOM watcher needs it"
[[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] \
  || die "br_netfilter not loaded (modprobe br_netfilter): Services between pods on the bridge need it"
for cidr in "$CLUSTER_CIDR" "$SERVICE_CIDR"; do
  if clash="$(ip -4 route show root "$cidr" | grep -v "dev $BRIDGE" || true; ip -4 route show match "$cidr" | grep -v '^default' | grep -v "dev $BRIDGE" || true)" && [[ -n "$clash" ]]; then
    die "$cidr overlaps routes of this machine: $clash"
  fi
done
ip link show "$BRIDGE" >/dev/null 2>&1 && die "interface $BRIDGE exists but no cluster state: remove it (ip link del $BRIDGE) if nothing else uses it"
if iptables-save 2>/dev/null | grep -qE '^:(KUBE|CNI)-' || ip6tables-save 2>/dev/null | grep -qE '^:(KUBE|CNI)-'; then
  die "iptables already has KUBE-*/CNI-* chains: another Kubernetes or CNI runs here (or a crashed one left them); not starting next to it"
fi
ss -Htln "sport = :$API_PORT" | grep -q "$BRIDGE_IP:$API_PORT" && die "$BRIDGE_IP:$API_PORT in use"
# CoreDNS binds $DNS_IP:53; a wildcard listener on 53 (a local resolver) would take it.
if dns_busy="$(ss -Hlun "sport = :53"; ss -Hltn "sport = :53")" && grep -qE "(0\.0\.0\.0|\*|\[::\]|$DNS_IP):53 " <<<"$dns_busy"; then
  die "port 53 is taken on all addresses or on $DNS_IP (cluster DNS binds $DNS_IP:53): $dns_busy"
fi
# With FERRITE_CLUSTER_DNS_FORWARD=1 names outside the cluster go to the
# host's resolvers; one that is the cluster DNS itself would loop.
if [[ "$DNS_FORWARD" == 1 ]] && grep -qE "^nameserver[[:space:]]+$DNS_IP([[:space:]]|\$)" /etc/resolv.conf; then
  die "/etc/resolv.conf names $DNS_IP, the cluster DNS address"
fi

# ---------------------------------------------------------------- state + baseline
mkdir -p "$STATE"/{certs,etcd,containerd,cni/net.d,cni/networks,kubelet,pod-logs,config,before}
: >"$STATE/ports"
# The node directory of the model cache, as a node image or a one-off job
# prepares it on a real cluster: the pods that write it are not root.
install -d -m 0755 -o "$MODEL_CACHE_UID" -g "$MODEL_CACHE_UID" "$MODEL_CACHE_DIR"
trap 'rc=$?; if ((rc != 0)); then
  echo "up.sh failed (exit $rc); logs in $STATE/*.log" >&2
  if [[ "${KEEP_ON_FAILURE:-0}" == 1 ]]; then echo "KEEP_ON_FAILURE=1: leaving it running; e2e/cluster/down.sh cleans up" >&2
  else FERRITE_CLUSTER_LOCKED=1 FERRITE_KEEP_LOGS=1 "$CLUSTER_LIB_DIR/down.sh" >&2 || true; fi
fi' EXIT
step "saving iptables rules and sysctls to $STATE/before"
iptables-save >"$STATE/before/iptables" 2>/dev/null || true
ip6tables-save >"$STATE/before/ip6tables" 2>/dev/null || true
for s in "${SYSCTLS[@]}"; do
  v="$(sysctl -n "$s" 2>/dev/null)" && printf '%s=%s\n' "$s" "$v"
done >"$STATE/before/sysctl"
# paths outside STATE that the kubelet/containerd create when absent
for p in /var/log/containers /var/lib/cni /var/lib/cni/results /run/containerd /run/containerd/s; do [[ -e "$p" ]] && echo "$p"; done >"$STATE/before/paths" || true
ls -d /var/lib/cni/results/* >"$STATE/before/cni-results" 2>/dev/null || true
for c in /sys/fs/cgroup/*/; do [[ -d "$c/kubepods" || -d "${c}kubepods.slice" ]] && echo "$c"; done >"$STATE/before/cgroups" || true
echo "$BRIDGE" >"$STATE/before/bridge"

# ---------------------------------------------------------------- images
step "images: pause (static C) and hello (static Go), OCI archives in $IMG_DIR"
mkdir -p "$IMG_DIR"
# The one OCI image writer, the one `make images` uses (static binaries: --file,
# no libraries to resolve).
OCI_WRITER="$ROOT/images/build-oci.py"
build_img() { # NAME REF SRC-HASH BUILD-CMD... (the binary goes to $IMG_DIR/NAME.bin)
  local name="$1" ref="$2" hash="$3"; shift 3
  local stamp="$IMG_DIR/$name.stamp" want="$hash|$ref|$(sha256sum "$OCI_WRITER" | cut -c1-16)"
  if [[ -f "$IMG_DIR/$name.oci.tar" && "$(cat "$stamp" 2>/dev/null)" == "$want" ]]; then return; fi
  "$@"
  rm -f "$stamp"
  echo "$want" >"$stamp.new"
  mv "$stamp.new" "$stamp"
}
pause_hash="$(cat "$CLUSTER_LIB_DIR/pause.c" | sha256sum | cut -c1-16)"
build_img pause "$PAUSE_IMAGE" "$pause_hash" bash -c "
  gcc -Os -static -Wall -o '$IMG_DIR/pause.bin' '$CLUSTER_LIB_DIR/pause.c' && strip '$IMG_DIR/pause.bin' &&
  python3 '$OCI_WRITER' --ref '$PAUSE_IMAGE' -o '$IMG_DIR/pause.oci.tar' \
    --file '$IMG_DIR/pause.bin:/pause' --entrypoint /pause --user 65535:65535"
hello_hash="$(cat "$CLUSTER_LIB_DIR/hello/main.go" | sha256sum | cut -c1-16)"
build_img hello "$HELLO_IMAGE" "$hello_hash" bash -c "
  cd '$CLUSTER_LIB_DIR/hello' && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS= go build -trimpath -ldflags '-s -w' -o '$IMG_DIR/hello.bin' main.go &&
  python3 '$OCI_WRITER' --ref '$HELLO_IMAGE' -o '$IMG_DIR/hello.oci.tar' \
    --file '$IMG_DIR/hello.bin:/hello' --entrypoint /hello --user 65532:65532 --expose 8080"

# ---------------------------------------------------------------- certificates
step "certificates and kubeconfigs"
C="$STATE/certs"
cert_ca "$C" 365
SAN_API="IP:$BRIDGE_IP,IP:$KUBERNETES_SVC_IP,IP:127.0.0.1,DNS:localhost,DNS:$NODE_NAME,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$CLUSTER_DOMAIN"
cert_leaf "$C" 365 apiserver "/CN=kube-apiserver" "$(cert_server_ext "$SAN_API")"
cert_leaf "$C" 365 apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$CERT_CLIENT"
cert_leaf "$C" 365 front-proxy-client "/CN=front-proxy-client" "$CERT_CLIENT"
cert_leaf "$C" 365 admin "/O=system:masters/CN=ferrite-admin" "$CERT_CLIENT"
cert_leaf "$C" 365 kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$CERT_CLIENT"
cert_leaf "$C" 365 kubelet-serving "/O=system:nodes/CN=system:node:$NODE_NAME" "$(cert_server_ext "IP:$BRIDGE_IP,DNS:$NODE_NAME")"
cert_leaf "$C" 365 kube-proxy "/CN=system:kube-proxy" "$CERT_CLIENT"
cert_leaf "$C" 365 kube-scheduler "/CN=system:kube-scheduler" "$CERT_CLIENT"
cert_leaf "$C" 365 kube-controller-manager "/CN=system:kube-controller-manager" "$CERT_CLIENT"
cert_leaf "$C" 365 coredns "/CN=$DNS_USER" "$CERT_CLIENT"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$C/sa.key" 2>/dev/null
openssl pkey -in "$C/sa.key" -pubout -out "$C/sa.pub" 2>/dev/null
chmod 600 "$C"/*.key
b64() { base64 -w0 <"$1"; }
kubeconfig() { # FILE USER (certs/USER.{crt,key}); certificates embedded: the file stands alone
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ferrite
  cluster:
    server: https://$BRIDGE_IP:$API_PORT
    certificate-authority-data: $(b64 "$C/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(b64 "$C/$2.crt")
    client-key-data: $(b64 "$C/$2.key")
contexts:
- name: ferrite
  context: {cluster: ferrite, user: $2}
current-context: ferrite
EOF
  chmod 600 "$1"
}
for u in admin kubelet kube-proxy kube-scheduler kube-controller-manager coredns; do kubeconfig "$STATE/$u.kubeconfig" "$u"; done

# ---------------------------------------------------------------- network
step "network: bridge $BRIDGE $BRIDGE_IP/24, route $SERVICE_CIDR, forwarding confined to the bridge"
ip link add "$BRIDGE" type bridge
ip addr add "$BRIDGE_IP/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
# Service IPs go to the bridge, never to the default route: from the host,
# kube-proxy's DNAT takes them to a pod; an IP with no Service dies here.
ip route add "$SERVICE_CIDR" dev "$BRIDGE" src "$BRIDGE_IP"
sysctl -qw net.ipv4.ip_forward=1
# Our own chain, jumped to from FORWARD: pods talk to pods (and, via INPUT, to
# this host); nothing is forwarded between the bridge and any other interface.
iptables -w -N FERRITE-FORWARD
iptables -w -A FERRITE-FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment "$IPT_MARK: pod to pod" -j RETURN
iptables -w -A FERRITE-FORWARD -i "$BRIDGE" -m comment --comment "$IPT_MARK: pods stay on this machine" -j DROP
iptables -w -A FERRITE-FORWARD -o "$BRIDGE" -m comment --comment "$IPT_MARK: nothing from outside to pods" -j DROP
iptables -w -I FORWARD 1 -m comment --comment "$IPT_MARK" -j FERRITE-FORWARD

cat >"$STATE/cni/net.d/10-ferrite.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/networks",
        "ranges": [[{"subnet": "$NODE_POD_CIDR", "gateway": "$BRIDGE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": false},
    {"type": "loopback"}
  ]
}
EOF
# The kubelet's resolvConf: what pods with dnsPolicy Default get (ClusterFirst
# ones, the usual, get the cluster DNS $DNS_IP and the cluster search list
# instead). Default pods have no server but their own loopback: lookups fail
# at once.
cat >"$STATE/config/resolv.conf" <<EOF
# ferrite local cluster: dnsPolicy Default pods have no DNS (ClusterFirst ones use $DNS_IP).
nameserver 127.0.0.1
options ndots:1 timeout:1 attempts:1
EOF

# ---------------------------------------------------------------- containerd
step "containerd (socket $CONTAINERD_SOCK)"
cat >"$STATE/config/containerd.toml" <<EOF
version = 2
root = "$STATE/containerd/root"
state = "$STATE/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  tolerate_missing_hugetlb_controller = true
  # This machine withholds CAP_SYS_RESOURCE even from root: runc cannot lower
  # oom_score_adj below containerd's own (the pause container asks for -998).
  # Clamp instead of failing every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$STATE/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$STATE/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
EOF
# setsid: the daemons outlive this script and ignore the terminal's signals.
daemon() { # NAME CMD...
  local name="$1"; shift
  setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null 8>&- &
  echo $! >"$STATE/$name.pid"
}
start_containerd() {
  daemon containerd containerd --config "$STATE/config/containerd.toml"
  local deadline=$((SECONDS + 30))
  until ctr_ version >/dev/null 2>&1; do
    alive "$(cat "$STATE/containerd.pid")" || { tail -20 "$STATE/containerd.log" >&2; die "containerd exited"; }
    ((SECONDS < deadline)) || die "containerd did not answer in 30s"
    sleep 0.2
  done
}
start_containerd
for img in pause hello; do
  ctr_ images import "$IMG_DIR/$img.oci.tar" >/dev/null
done
ctr_ images ls -q | grep -qx "$PAUSE_IMAGE" || die "pause image not imported"
# The CRI plugin keeps its own list of images, filled from containerd's events
# once its event loop runs - which can be after the socket answers, so an
# import right after start may be missed (a CI run saw every sandbox fail with
# "failed to pull ferrite.local/pause"). A restart makes it read them all from
# the store; the kubelet check below proves it.
stop_pid "$(cat "$STATE/containerd.pid")" 15
start_containerd

# ---------------------------------------------------------------- etcd
step "etcd"
etcd_port="$(free_port)"; echo "ETCD_PORT=$etcd_port" >>"$STATE/ports"
etcd_peer="$(free_port)"; echo "ETCD_PEER_PORT=$etcd_peer" >>"$STATE/ports"
daemon etcd "$K8S_BIN/etcd" \
  --name=default --data-dir="$STATE/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
  --initial-cluster="default=http://127.0.0.1:$etcd_peer" \
  --listen-metrics-urls="" \
  --unsafe-no-fsync=true --log-level=warn
READY_TIMEOUT=30 wait_http etcd "http://127.0.0.1:$etcd_port/health"

# ---------------------------------------------------------------- apiserver
step "kube-apiserver on https://$BRIDGE_IP:$API_PORT"
daemon kube-apiserver "$K8S_BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --bind-address="$BRIDGE_IP" --advertise-address="$BRIDGE_IP" --secure-port="$API_PORT" \
  --cert-dir="$STATE/certs/apiserver" \
  --tls-cert-file="$C/apiserver.crt" --tls-private-key-file="$C/apiserver.key" \
  --client-ca-file="$C/ca.crt" \
  --kubelet-client-certificate="$C/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$C/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$C/ca.crt" \
  --kubelet-preferred-address-types=InternalIP,Hostname \
  --requestheader-client-ca-file="$C/ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$C/front-proxy-client.crt" --proxy-client-key-file="$C/front-proxy-client.key" \
  --service-account-issuer="https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
  --service-account-key-file="$C/sa.pub" --service-account-signing-key-file="$C/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true \
  --profiling=false \
  --v=1
READY_TIMEOUT=60 wait_http kube-apiserver "https://$BRIDGE_IP:$API_PORT/readyz" \
  --cacert "$C/ca.crt" --cert "$C/admin.crt" --key "$C/admin.key"

# ---------------------------------------------------------------- controllers
step "kube-controller-manager, kube-scheduler"
kcm_port="$(free_port)"; echo "KCM_PORT=$kcm_port" >>"$STATE/ports"
daemon kube-controller-manager "$K8S_BIN/kube-controller-manager" \
  --kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$kcm_port" --cert-dir="$STATE/certs/kcm" \
  --controllers='*' --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$C/sa.key" --root-ca-file="$C/ca.crt" \
  --cluster-signing-cert-file="$C/ca.crt" --cluster-signing-key-file="$C/ca.key" \
  --allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size=24 \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --profiling=false --v=1
sched_port="$(free_port)"; echo "SCHEDULER_PORT=$sched_port" >>"$STATE/ports"
daemon kube-scheduler "$K8S_BIN/kube-scheduler" \
  --kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$sched_port" --cert-dir="$STATE/certs/scheduler" \
  --leader-elect=false --profiling=false --v=1

# ---------------------------------------------------------------- kube-proxy
step "kube-proxy (iptables mode)"
proxy_health="$(free_port)"; echo "PROXY_HEALTHZ_PORT=$proxy_health" >>"$STATE/ports"
proxy_metrics="$(free_port)"; echo "PROXY_METRICS_PORT=$proxy_metrics" >>"$STATE/ports"
cat >"$STATE/config/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $STATE/kube-proxy.kubeconfig
mode: iptables
clusterCIDR: $CLUSTER_CIDR
detectLocalMode: ClusterCIDR
hostnameOverride: $NODE_NAME
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:$proxy_health
metricsBindAddress: 127.0.0.1:$proxy_metrics
# NodePorts only on the bridge address, never on the machine's own interfaces.
nodePortAddresses: ["$BRIDGE_IP/32"]
iptables:
  localhostNodePorts: false
  masqueradeAll: false
  syncPeriod: 30s
  minSyncPeriod: 1s
# leave the machine's conntrack settings alone
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
daemon kube-proxy "$K8S_BIN/kube-proxy" --config="$STATE/config/kube-proxy.yaml" --v=1

# ---------------------------------------------------------------- cluster DNS
if [[ "$DNS_FORWARD" == 1 ]]; then dns_other="other names to the host's resolver"; else dns_other="other names: SERVFAIL, not forwarded"; fi
step "cluster DNS: CoreDNS on $DNS_IP:53 (kubernetes plugin as $DNS_USER; $dns_other)"
# Least privilege: list/watch of what the kubernetes plugin serves (Services,
# EndpointSlices, Namespaces; no Pods: the Corefile has no `pods verified`).
kubectl_ apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "ferrite:coredns"}
rules:
- apiGroups: [""]
  resources: [services, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "ferrite:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "ferrite:coredns"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: $DNS_USER}
EOF
dns_health="$(free_port)"; echo "DNS_HEALTH_PORT=$dns_health" >>"$STATE/ports"
dns_ready="$(free_port)"; echo "DNS_READY_PORT=$dns_ready" >>"$STATE/ports"
dns_metrics="$(free_port)"; echo "DNS_METRICS_PORT=$dns_metrics" >>"$STATE/ports"
# Names outside the cluster domain: by default answered SERVFAIL here, at once
# (no plugin serves them), so no lookup a pod makes leaves the machine: the
# server image's ONNX Runtime looks up a telemetry host, and a resolver that
# exhausts the search list (a Service just deleted) tries the bare name
# `<svc>.<ns>.svc.`. FERRITE_CLUSTER_DNS_FORWARD=1 forwards them to the host's
# resolvers, as a real cluster does (never in tests).
# No `loop` plugin: its start-up probe is a query for a random name that
# `forward` would send out of the machine; the preflight above rules out the
# loop it guards against (the host resolving through $DNS_IP).
dns_forward_line="# no forward: names outside $CLUSTER_DOMAIN get SERVFAIL (FERRITE_CLUSTER_DNS_FORWARD=1 forwards them)"
[[ "$DNS_FORWARD" == 1 ]] && dns_forward_line="forward . /etc/resolv.conf"
cat >"$STATE/config/Corefile" <<EOF
.:53 {
    bind $DNS_IP
    errors
    health 127.0.0.1:$dns_health
    ready 127.0.0.1:$dns_ready
    # coredns_forward_requests_total: tests check that none of their lookups left the machine
    prometheus 127.0.0.1:$dns_metrics
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $STATE/coredns.kubeconfig ferrite
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    $dns_forward_line
    cache 30
}
EOF
daemon coredns "$K8S_BIN/coredns" -conf "$STATE/config/Corefile"
# /ready answers 200 once the kubernetes plugin has synced Services and
# EndpointSlices: from then on no pod's lookup of a Service fails for want of it.
READY_TIMEOUT=30 wait_http coredns "http://127.0.0.1:$dns_ready/ready"

# ---------------------------------------------------------------- kubelet
step "kubelet (node $NODE_NAME, $BRIDGE_IP)"
kubelet_health="$(free_port)"; echo "KUBELET_HEALTHZ_PORT=$kubelet_health" >>"$STATE/ports"
cat >"$STATE/config/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $BRIDGE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_health
tlsCertFile: $C/kubelet-serving.crt
tlsPrivateKeyFile: $C/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $C/ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
resolvConf: $STATE/config/resolv.conf
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$DNS_IP]
podLogsDir: $STATE/pod-logs
podCIDR: $NODE_POD_CIDR
maxPods: 110
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
serializeImagePulls: false
# images come from \`ctr import\` only (no registry): never collect them
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# a dev machine: evict only when really out of room
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
  imagefs.inodesFree: "1%"
evictionPressureTransitionPeriod: 30s
nodeStatusUpdateFrequency: 5s
nodeStatusReportFrequency: 1m
syncFrequency: 10s
fileCheckFrequency: 10s
containerLogMaxSize: 10Mi
containerLogMaxFiles: 2
EOF
daemon kubelet "$K8S_BIN/kubelet" \
  --config="$STATE/config/kubelet.yaml" \
  --kubeconfig="$STATE/kubelet.kubeconfig" \
  --root-dir="$STATE/kubelet" \
  --cert-dir="$STATE/certs/kubelet" \
  --hostname-override="$NODE_NAME" \
  --node-ip="$BRIDGE_IP" \
  --v=1

# ---------------------------------------------------------------- ready
step "waiting for node $NODE_NAME Ready"
deadline=$((SECONDS + READY_TIMEOUT))
while :; do
  for n in "${PROCS[@]}"; do
    alive "$(cat "$STATE/$n.pid")" || { tail -n 40 "$STATE/$n.log" >&2; die "$n exited; log: $STATE/$n.log"; }
  done
  st="$(kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null || true)"
  [[ "$st" == True ]] && break
  if ((SECONDS >= deadline)); then
    kubectl_ describe node "$NODE_NAME" >&2 2>&1 || true
    tail -n 40 "$STATE/kubelet.log" >&2
    die "node $NODE_NAME not Ready after ${READY_TIMEOUT}s (kubelet log: $STATE/kubelet.log)"
  fi
  sleep 0.5
done
# The kubelet lists the node's images through the CRI: the sandbox image must be
# among them, or no pod can start (and only pod events would say why).
until kubectl_ get node "$NODE_NAME" -o jsonpath='{.status.images[*].names}' 2>/dev/null | grep -q "$PAUSE_IMAGE"; do
  if ((SECONDS >= deadline)); then
    tail -n 20 "$STATE/containerd.log" >&2
    die "the kubelet does not see the sandbox image $PAUSE_IMAGE through the CRI (containerd log: $STATE/containerd.log)"
  fi
  sleep 0.5
done
# Pods need the namespace's default ServiceAccount, which the controller
# manager creates a moment after start.
until kubectl_ -n default get serviceaccount default >/dev/null 2>&1; do
  ((SECONDS < deadline)) || die "no default ServiceAccount after ${READY_TIMEOUT}s"
  sleep 0.3
done

cp "$STATE/admin.kubeconfig" "$OUT_DIR/kubeconfig.tmp" && mv "$OUT_DIR/kubeconfig.tmp" "$OUT_DIR/kubeconfig"
cat >"$OUT_DIR/env" <<EOF
KUBECONFIG=$OUT_DIR/kubeconfig
CONTAINERD_ADDRESS=$CONTAINERD_SOCK
CONTAINERD_NAMESPACE=k8s.io
K8S_BIN=$K8S_BIN
FERRITE_CLUSTER_DIR=$STATE
FERRITE_NODE_NAME=$NODE_NAME
FERRITE_NODE_IP=$BRIDGE_IP
FERRITE_POD_CIDR=$NODE_POD_CIDR
FERRITE_SERVICE_CIDR=$SERVICE_CIDR
FERRITE_DNS_IP=$DNS_IP
FERRITE_DNS_METRICS_URL=http://127.0.0.1:$dns_metrics/metrics
FERRITE_CLUSTER_DOMAIN=$CLUSTER_DOMAIN
FERRITE_PAUSE_IMAGE=$PAUSE_IMAGE
FERRITE_HELLO_IMAGE=$HELLO_IMAGE
FERRITE_MODEL_CACHE_DIR=$MODEL_CACHE_DIR
EOF
trap - EXIT
step "cluster up: node $NODE_NAME Ready, Kubernetes $("$K8S_BIN/kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), kubeconfig $OUT_DIR/kubeconfig"
echo "$OUT_DIR/kubeconfig"
