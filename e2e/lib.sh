# e2e/lib.sh: shell helpers shared by e2e/start-apiserver.sh and e2e/cluster/*.sh.
# Source it; it defines functions only (and expects `set -euo pipefail` from the
# caller). Functions that keep files use $STATE: the caller's state dir, holding
# NAME.pid, NAME.log and `ports` for what they start.

log() { echo "==> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# A TCP port nothing listens on now, not yet handed out (recorded in
# $STATE/ports as KEY=PORT lines). A race with another program is possible
# but rare.
free_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 30000))
    if ! ss -Htln "sport = :$p" | grep -q .; then
      grep -qs "=$p\$" "$STATE/ports" || { echo "$p"; return; }
    fi
  done
  die "no free port found"
}

# wait_http NAME URL [curl args...]: until URL answers 2xx, NAME's process
# ($STATE/NAME.pid) dies, or READY_TIMEOUT (default 60) seconds pass.
wait_http() {
  local name="$1" url="$2"; shift 2
  local pid; pid="$(cat "$STATE/$name.pid")"
  local deadline=$((SECONDS + ${READY_TIMEOUT:-60}))
  until curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$STATE/$name.log" >&2; die "$name exited; log: $STATE/$name.log"; }
    ((SECONDS < deadline)) || { tail -n 30 "$STATE/$name.log" >&2; die "$name not ready after ${READY_TIMEOUT:-60}s"; }
    sleep 0.2
  done
}

# spawn NAME CMD...: start CMD in the background, output to $STATE/NAME.log,
# pid to $STATE/NAME.pid.
spawn() {
  local name="$1"; shift
  nohup "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

# stop_pid PID [SECONDS]: TERM, wait up to SECONDS (default 10), then KILL.
stop_pid() {
  local pid="$1" t="${2:-10}"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq $((t * 5))); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 25); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
}

# Certificates with openssl 3.x: an EC P-256 CA and leaves it signs.
#   cert_ca DIR DAYS                        DIR/ca.{crt,key}
#   cert_leaf DIR DAYS NAME SUBJECT EXTS    DIR/NAME.{crt,key}; EXTS is an
#                                           openssl extension file's text
CERT_EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
cert_ca() {
  command -v openssl >/dev/null || die "openssl not found"
  openssl req -x509 "${CERT_EC[@]}" -keyout "$1/ca.key" -out "$1/ca.crt" -days "$2" \
    -subj "/CN=ferrite-e2e-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  chmod 600 "$1/ca.key"
}
cert_leaf() {
  local d="$1" days="$2" name="$3" subj="$4" ext="$5"
  openssl req "${CERT_EC[@]}" -keyout "$d/$name.key" -out "$d/$name.csr" -subj "$subj" 2>/dev/null
  printf '%s\n' "$ext" >"$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days "$days" -sha256 -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
  rm -f "$d/$name.csr" "$d/$name.ext"
  chmod 600 "$d/$name.key"
}
# Extension texts for cert_leaf.
CERT_CLIENT="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
cert_server_ext() { # SAN-LIST (e.g. IP:127.0.0.1,DNS:localhost)
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=$1"
}

# write_kubeconfig FILE SERVER CA CERT KEY: a kubeconfig with one cluster,
# one user (client certificate) and one context, all named ferrite-e2e
# (the user: ferrite-admin).
write_kubeconfig_cert() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ferrite-e2e
  cluster:
    server: $2
    certificate-authority: $3
users:
- name: ferrite-admin
  user:
    client-certificate: $4
    client-key: $5
contexts:
- name: ferrite-e2e
  context: {cluster: ferrite-e2e, user: ferrite-admin}
current-context: ferrite-e2e
EOF
}
