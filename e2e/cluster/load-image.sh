#!/usr/bin/env bash
# Import OCI (or docker-archive) image archives into the local cluster's
# containerd, namespace k8s.io, where the kubelet finds them.
#
#   e2e/cluster/load-image.sh ARCHIVE...
#
# Pods must not pull them: use a tag other than :latest (or set
# imagePullPolicy: IfNotPresent / Never); there is no registry.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"
(($#)) || die "usage: $0 ARCHIVE..."
[[ -S "$CONTAINERD_SOCK" ]] || die "the cluster's containerd is not running ($CONTAINERD_SOCK); run e2e/cluster/up.sh"
for a in "$@"; do
  ctr_ images import --all-platforms "$a" >&2
done
