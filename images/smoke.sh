#!/usr/bin/env bash
# Run the built images for real with containerd + runc (no Docker, no Kubernetes):
#   - ferrite-server on its embedded demo model, read-only root filesystem, host
#     network on loopback: model metadata and one inference over HTTP; the process
#     must run as uid/gid 65532
#   - ferrite-operator crdgen: must print the CRD as YAML
#   - the server image has no shell
#
# Uses the containerd at CONTAINERD_ADDRESS when set (namespace ferrite-images,
# removed afterwards); otherwise starts a private containerd (its own config,
# socket, root and state under a temporary directory) and stops it at the end.
# Needs root, containerd, ctr and runc (Debian: apt-get install containerd runc).
#
#   images/smoke.sh [.cache/images]
set -euo pipefail

DIR=${1:-.cache/images}
SERVER=$DIR/ferrite-server.oci.tar
OPERATOR=$DIR/ferrite-operator.oci.tar
NS=ferrite-images
for f in "$SERVER" "$OPERATOR"; do [[ -f $f ]] || { echo "smoke: $f missing (make images)" >&2; exit 1; }; done
for t in ctr containerd runc curl python3; do command -v $t >/dev/null || { echo "smoke: $t not installed" >&2; exit 1; }; done

ref_of() { python3 -c 'import json,sys,tarfile; t=tarfile.open(sys.argv[1]); i=json.load(t.extractfile("index.json")); print(i["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"])' "$1"; }
SERVER_REF=$(ref_of "$SERVER")
OPERATOR_REF=$(ref_of "$OPERATOR")

TMP=$(mktemp -d /tmp/ferrite-smoke.XXXXXX)
CTRD_PID=
cleanup() {
  set +e
  if [[ -n ${ADDR:-} ]]; then
    for c in ferrite-smoke-server ferrite-smoke-crdgen ferrite-smoke-sh; do
      ctr -a "$ADDR" -n $NS tasks kill -s SIGKILL $c >/dev/null 2>&1
      sleep 0.2
      ctr -a "$ADDR" -n $NS containers rm $c >/dev/null 2>&1
    done
    ctr -a "$ADDR" -n $NS images rm "$SERVER_REF" "$OPERATOR_REF" >/dev/null 2>&1
  fi
  [[ -n $CTRD_PID ]] && kill "$CTRD_PID" && wait "$CTRD_PID" 2>/dev/null
  [[ -n $CTRD_PID ]] && umount -R "$TMP/root" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

if [[ -n ${CONTAINERD_ADDRESS:-} ]]; then
  ADDR=$CONTAINERD_ADDRESS
else
  ADDR=$TMP/containerd.sock
  cat > "$TMP/config.toml" <<EOF
version = 2
root = "$TMP/root"
state = "$TMP/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$ADDR"
[ttrpc]
  address = "$ADDR.ttrpc"
[debug]
  address = "$TMP/debug.sock"
EOF
  containerd --config "$TMP/config.toml" > "$TMP/containerd.log" 2>&1 &
  CTRD_PID=$!
  for _ in $(seq 50); do ctr -a "$ADDR" version >/dev/null 2>&1 && break; sleep 0.2; done
  ctr -a "$ADDR" version >/dev/null || { cat "$TMP/containerd.log" >&2; exit 1; }
  echo "==> private containerd (pid $CTRD_PID) at $ADDR"
fi
C="ctr -a $ADDR -n $NS"

echo "==> import"
$C images import "$SERVER"
$C images import "$OPERATOR"

read -r HTTP GRPC METRICS < <(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')

echo "==> run $SERVER_REF (read-only root, uid from the image, host network on 127.0.0.1)"
$C run --rm --net-host --read-only "$SERVER_REF" ferrite-smoke-server \
  /usr/bin/ferrite-server serve --host 127.0.0.1 --http-port "$HTTP" --grpc-port "$GRPC" --metrics-port "$METRICS" \
  > "$TMP/server.log" 2>&1 &
RUN_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$HTTP/v2/health/ready" >/dev/null && break; sleep 0.2; done
echo "--- model metadata"
curl -sf "http://127.0.0.1:$HTTP/v2/models/demo"; echo
echo "--- infer"
OUT=$(curl -sf -X POST "http://127.0.0.1:$HTTP/v2/models/demo/infer" \
  -d '{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}')
echo "$OUT"
grep -q '"probabilities"' <<<"$OUT" || { echo "smoke: no probabilities in the answer" >&2; cat "$TMP/server.log" >&2; exit 1; }
curl -sf "http://127.0.0.1:$METRICS/metrics" | grep -q '^ferrite_' || { echo "smoke: no ferrite_ metrics" >&2; exit 1; }
PID=$($C tasks ls | awk '$1 == "ferrite-smoke-server" {print $2}')
IDS=$(grep -E '^(Uid|Gid):' "/proc/$PID/status" | tr -s '\t ' ' ')
echo "--- process $PID: $IDS"
[[ $(awk '/^Uid:/{print $2 $3 $4 $5}' "/proc/$PID/status") == 65532655326553265532 ]] || { echo "smoke: not uid 65532" >&2; exit 1; }
[[ $(awk '/^Gid:/{print $2 $3 $4 $5}' "/proc/$PID/status") == 65532655326553265532 ]] || { echo "smoke: not gid 65532" >&2; exit 1; }
$C tasks kill -s SIGTERM ferrite-smoke-server
wait $RUN_PID || true
echo "--- server log"
cat "$TMP/server.log"

echo "==> run $OPERATOR_REF crdgen"
$C run --rm --read-only "$OPERATOR_REF" ferrite-smoke-crdgen /usr/bin/ferrite-operator crdgen > "$TMP/crd.yaml"
head -5 "$TMP/crd.yaml"
grep -q '^kind: CustomResourceDefinition' "$TMP/crd.yaml" || { echo "smoke: crdgen printed no CRD" >&2; exit 1; }

echo "==> no shell in $SERVER_REF"
if $C run --rm "$SERVER_REF" ferrite-smoke-sh /bin/sh -c true >/dev/null 2>&1; then
  echo "smoke: /bin/sh ran" >&2; exit 1
fi
echo "==> smoke test passed"
