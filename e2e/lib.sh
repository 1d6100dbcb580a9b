# e2e/lib.sh: shell helpers shared by e2e/start-apiserver.sh and e2e/cluster/*.sh.
# Source it; it defines functions only (and expects `set -euo pipefail` from the
# caller). Functions that keep files use $STATE: the caller's state dir, holding
# NAME.pid, NAME.log and `ports` for what they start.

log() { echo "==> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# alive PID: the process exists and is not a zombie (an init that reaps late
# leaves exited daemons as zombies for a while; `kill -0` succeeds on those).
alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]; }

# A TCP port no socket uses now, not yet handed out (recorded in
# $STATE/ports as KEY=PORT lines), below the kernel's ephemeral range so that
# no outgoing connection (say, the apiserver's to etcd) takes it before the
# server that gets it binds. A race with another program is possible but rare.
free_port() {
  local p lo=20000 hi eph
  eph="$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
  hi=$((eph - 1)); ((hi - lo >= 2000)) || hi=50000
  for _ in $(seq 100); do
    p=$((lo + RANDOM % (hi - lo)))
    if ! ss -Htan "sport = :$p" | grep -q .; then
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
    alive "$pid" || { tail -n 30 "$STATE/$name.log" >&2; die "$name exited; log: $STATE/$name.log"; }
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
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq $((t * 5))); do alive "$pid" || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 25); do alive "$pid" || return 0; sleep 0.2; done
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
