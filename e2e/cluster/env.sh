# e2e/cluster/env.sh: names, addresses and paths of the local cluster, shared by
# up.sh, down.sh, load-image.sh and check.sh. Sourced; defines variables and a
# few helpers only.

CLUSTER_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
E2E_DIR="$(cd "$CLUSTER_LIB_DIR/.." && pwd)"
ROOT="$(cd "$E2E_DIR/.." && pwd)"
# shellcheck source=../lib.sh
source "$E2E_DIR/lib.sh"

K8S_BIN="${K8S_BIN:-$("$E2E_DIR/build-control-plane.sh" --print-bin-dir)}"
CLUSTER_BINS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl coredns)

# Runtime state: certificates, etcd data, containerd root/state, kubelet root,
# logs, pids, and what the machine looked like before (iptables, sysctls).
# Everything the cluster writes is under it, except what the kernel keeps
# (bridge, routes, iptables rules, cgroups, sysctls: all undone by down.sh)
# and libcni's cache files /var/lib/cni/results/ferrite-* (removed by down.sh).
STATE="${FERRITE_CLUSTER_DIR:-/var/lib/ferrite-cluster}"
# What users and tests read: kubeconfig, env (KUBECONFIG=, CONTAINERD_ADDRESS=, ...).
OUT_DIR="${FERRITE_CLUSTER_OUT:-$ROOT/.cache/k8s/cluster}"
# Images built here (pause, hello) are cached across runs.
IMG_DIR="$ROOT/.cache/k8s/images"
LOCK_FILE="$ROOT/.cache/k8s/cluster.lock"

NODE_NAME=ferrite-node
BRIDGE=ferrite0
CLUSTER_CIDR=10.88.0.0/16        # pods (kube-controller-manager --cluster-cidr)
NODE_POD_CIDR=10.88.0.0/24       # this node's share: the CNI range
BRIDGE_IP=10.88.0.1              # gateway; apiserver, kubelet listen here
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
API_PORT=6443
KUBELET_PORT=10250
CLUSTER_DOMAIN=cluster.local
# Cluster DNS: CoreDNS as a host process on the bridge address (UDP+TCP 53);
# the kubelet's clusterDNS. Its kubernetes plugin reads the API as the user
# below, bound to a ClusterRole that may only list/watch what it serves.
DNS_IP=$BRIDGE_IP
DNS_USER=ferrite-coredns
# 1: names outside the cluster domain go on to the host's resolvers (as on a
# real cluster); default 0: refused by CoreDNS, nothing leaves the machine.
DNS_FORWARD="${FERRITE_CLUSTER_DNS_FORWARD:-0}"
CNI_NETWORK=ferrite
CNI_BIN_DIR=/usr/lib/cni         # Debian's containernetworking-plugins
PAUSE_IMAGE=ferrite.local/pause:3.10
HELLO_IMAGE=ferrite.local/hello:1

CONTAINERD_SOCK="$STATE/containerd/containerd.sock"
# The node model cache (docs/model-cache.md): the chart's modelCache.hostPath.
# Owned by the model pods' user (65532), who run non-root and write it.
MODEL_CACHE_DIR="$STATE/model-cache"
MODEL_CACHE_UID=65532
IPT_MARK="ferrite-cluster"       # comment on the rules up.sh adds itself

# Sysctls the cluster may change (kubelet's kernel defaults, kube-proxy, our
# forwarding); saved before, restored by down.sh.
SYSCTLS=(net.ipv4.ip_forward vm.overcommit_memory vm.panic_on_oom kernel.panic
  kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables net.netfilter.nf_conntrack_max)

# Process names in start order; down.sh stops them in reverse.
PROCS=(containerd etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy coredns kubelet)

ctr_() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }
kubectl_() { "$K8S_BIN/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

T0=${T0:-$SECONDS}
step() { printf '[%4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
