#!/usr/bin/env bash
# Build the Kubernetes control-plane binaries (and helm, and CoreDNS) from the
# Go modules pinned in e2e/tools/go.mod, e2e/tools/helm/go.mod and
# e2e/tools/coredns/go.mod, into a cache that survives `cargo clean`:
#
#   .cache/k8s/<k8s-version>/bin/<name>          the binaries
#   .cache/k8s/<k8s-version>/stamps/<name>       what each one was built from
#   .cache/k8s/<k8s-version>/stamps/<name>.lock  held while <name> builds
#
# Usage: e2e/build-control-plane.sh [name...]
#   names: etcd kube-apiserver kube-controller-manager kube-scheduler kubelet
#          kube-proxy kubectl helm coredns
#   default: etcd kube-apiserver kube-controller-manager kubectl
#   `--print-bin-dir` prints the bin dir and exits (for Makefiles and harnesses).
#
# Idempotent: a binary whose stamp matches (same module pins, same flags) is
# skipped. Concurrent runs wait for each other per binary (flock). Needs only `go` and the Go
# module proxy; the first build of kube-apiserver takes minutes on 2 cores.
set -euo pipefail

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$E2E_DIR/.." && pwd)"
TOOLS="$E2E_DIR/tools"
HELM_TOOLS="$TOOLS/helm"
COREDNS_TOOLS="$TOOLS/coredns"

# The single source of the versions is go.mod; read them from there.
modver() { awk -v m="$1" '$1 == "require" { $1 = ""; $0 = $0 } $1 == m && $2 ~ /^v/ { print $2; exit }' "$2"; }
K8S_VERSION="$(modver k8s.io/kubernetes "$TOOLS/go.mod")"
HELM_VERSION="$(modver helm.sh/helm/v3 "$HELM_TOOLS/go.mod")"
COREDNS_VERSION="$(modver github.com/coredns/coredns "$COREDNS_TOOLS/go.mod")"
[[ -n "$K8S_VERSION" && -n "$HELM_VERSION" && -n "$COREDNS_VERSION" ]] || { echo "cannot read pinned versions from go.mod" >&2; exit 1; }

CACHE="${FERRITE_K8S_CACHE:-$ROOT/.cache/k8s}/$K8S_VERSION"
BIN="$CACHE/bin"
STAMPS="$CACHE/stamps"

if [[ "${1:-}" == "--print-bin-dir" ]]; then echo "$BIN"; exit 0; fi

DEFAULT=(etcd kube-apiserver kube-controller-manager kubectl)
NAMES=("$@")
[[ ${#NAMES[@]} -gt 0 ]] || NAMES=("${DEFAULT[@]}")

command -v go >/dev/null || { echo "go not found on PATH (Go >= 1.25 needed)" >&2; exit 1; }

export CGO_ENABLED=0
export GOFLAGS=-mod=mod
# Keep go from fetching a different toolchain; the local one must do.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

# Version stamping as Kubernetes' own hack/lib/version.sh does it, so that
# `kubectl version`, /version and helm's kubeVersion checks see a real release.
k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
K8S_X=""
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  K8S_X+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  K8S_X+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
# helm: as its Makefile does (version + the Kubernetes minor its client libs know).
helm_k8s="$(modver k8s.io/client-go "$HELM_TOOLS/go.mod")"; helm_k8s_minor="${helm_k8s#v0.}"; helm_k8s_minor="${helm_k8s_minor%%.*}"
HELM_X=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  HELM_X+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_k8s_minor"
done

# coredns: its own main (e2e/tools/coredns/main.go: only the plugins the
# cluster's Corefile uses); the version it reports is the pinned module's.
COREDNS_X=" -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"

# name -> module dir, main package, extra ldflags
spec() {
  case "$1" in
    etcd)                    echo "$TOOLS|go.etcd.io/etcd/server/v3|" ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kube-proxy|kubectl)
                             echo "$TOOLS|k8s.io/kubernetes/cmd/$1|$K8S_X" ;;
    helm)                    echo "$HELM_TOOLS|helm.sh/helm/v3/cmd/helm|$HELM_X" ;;
    coredns)                 echo "$COREDNS_TOOLS|.|$COREDNS_X" ;;
    *) return 1 ;;
  esac
}
for n in "${NAMES[@]}"; do spec "$n" >/dev/null || { echo "unknown binary: $n" >&2; exit 2; }; done

mkdir -p "$BIN" "$STAMPS"

go_version="$(go env GOVERSION)"
total_start=$SECONDS
for n in "${NAMES[@]}"; do
  IFS='|' read -r dir pkg xflags <<<"$(spec "$n")"
  # A stamp records everything that decides the output: the pins, the
  # toolchain and the flags. Change any of them and the binary is rebuilt.
  # A main package of our own ("."): its sources count too.
  want="$( { cat "$dir/go.mod" "$dir/go.sum"; [[ "$pkg" != . ]] || cat "$dir"/*.go; echo "$go_version|$pkg|$xflags"; } | sha256sum | cut -d' ' -f1)"
  # One lock per binary: a concurrent run building the same binary is waited
  # for (then its result is up to date); other binaries are not held up.
  exec 9>"$STAMPS/$n.lock"
  if ! flock -n 9; then
    echo "==> $n: another build is running; waiting" >&2
    flock 9
  fi
  if [[ -x "$BIN/$n" && -f "$STAMPS/$n" && "$(cat "$STAMPS/$n")" == "$want" ]]; then
    echo "==> $n: up to date ($BIN/$n)"
    exec 9>&-
    continue
  fi
  echo "==> $n: building $pkg ($(basename "$(dirname "$dir/go.mod")") module) ..."
  t0=$SECONDS
  rm -f "$STAMPS/$n"
  (cd "$dir" && go build -trimpath -ldflags "-s -w$xflags" -o "$BIN/.$n.tmp" "$pkg")
  mv -f "$BIN/.$n.tmp" "$BIN/$n"
  echo "$want" >"$STAMPS/$n"
  echo "==> $n: built in $((SECONDS - t0))s ($(du -h "$BIN/$n" | cut -f1))"
  exec 9>&-
done
echo "==> control plane ($K8S_VERSION) in $BIN [$((SECONDS - total_start))s]"
