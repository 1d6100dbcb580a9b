#!/usr/bin/env bash
# Stop the local cluster that e2e/cluster/up.sh started and undo everything it
# did to this machine: every process (kubelet, kube-proxy, coredns, scheduler,
# controller manager, apiserver, etcd, containerd, shims, containers), mounts, network
# namespaces, the bridge and its route, the iptables chains the cluster created
# (kube-proxy --cleanup, then any KUBE-*/CNI-*/FERRITE-* chain that was not
# there before, with the jumps to it), sysctls, cgroups, and the state dir.
# Then it checks: nothing of ours runs, nothing is mounted, the bridge is gone,
# and the iptables rules are those from before up.sh (a diff otherwise).
# Exit status 1 if anything is left. Safe to run when nothing is up.
set -euo pipefail
T0=$SECONDS
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"

[[ $EUID -eq 0 ]] || die "run as root"
if [[ "${FERRITE_CLUSTER_LOCKED:-0}" != 1 ]]; then
  mkdir -p "$(dirname "$LOCK_FILE")"
  exec 8>"$LOCK_FILE"
  flock -n 8 || { log "another up.sh/down.sh holds $LOCK_FILE; waiting"; flock 8; }
fi
rm -f "$OUT_DIR/kubeconfig" "$OUT_DIR/env"

if [[ ! -d "$STATE" ]]; then
  step "no cluster state in $STATE: nothing to stop"
  exit 0
fi

pid_of() { cat "$STATE/$1.pid" 2>/dev/null || true; }
# stop NAME... : TERM them all at once, wait up to STOP_WAIT (10) seconds, KILL the rest.
stop() {
  local n pid pids=()
  for n in "$@"; do
    pid="$(pid_of "$n")"
    alive "$pid" || continue
    # still our process, not a reused pid
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "$STATE/" || continue
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  ((${#pids[@]})) || return 0
  local deadline=$((SECONDS + ${STOP_WAIT:-10}))
  while ((SECONDS < deadline)); do
    for pid in "${pids[@]}"; do alive "$pid" && break; pid=; done
    [[ -z "$pid" ]] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  sleep 0.2
}
# pids of processes whose command line mentions PATTERN (a fixed string)
pids_mentioning() {
  local p
  for p in /proc/[0-9]*; do
    [[ "${p#/proc/}" != "$$" ]] || continue
    { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "$1" && echo "${p#/proc/}"
  done
  return 0
}

# 1. nothing may start new pods: kubelet, scheduler, controller manager.
step "stopping kubelet, kube-scheduler, kube-controller-manager"
stop kubelet kube-scheduler kube-controller-manager

# 2. containers, while containerd still runs.
if ctr_ version >/dev/null 2>&1; then
  tasks="$(ctr_ tasks ls -q 2>/dev/null || true)"
  step "killing $(wc -w <<<"$tasks") containers"
  for t in $tasks; do ctr_ tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1 || true; done
  for t in $tasks; do
    for _ in $(seq 25); do ctr_ tasks ls 2>/dev/null | awk -v t="$t" '$1 == t && $3 == "RUNNING" { f = 1 } END { exit !f }' || break; sleep 0.2; done
    ctr_ tasks delete -f "$t" >/dev/null 2>&1 || true
  done
  for c in $(ctr_ containers ls -q 2>/dev/null || true); do ctr_ containers delete "$c" >/dev/null 2>&1 || true; done
fi
step "stopping containerd and its shims"
STOP_WAIT=15 stop containerd
for pid in $(pids_mentioning "$CONTAINERD_SOCK"); do stop_pid "$pid" 5; done
# Anything still in the kubelet's cgroups is a pod's process whose shim died.
if [[ ! -s "$STATE/before/cgroups" ]]; then
  for f in /sys/fs/cgroup/*/kubepods/cgroup.procs /sys/fs/cgroup/*/kubepods/*/cgroup.procs /sys/fs/cgroup/*/kubepods/*/*/cgroup.procs /sys/fs/cgroup/*/kubepods/*/*/*/cgroup.procs; do
    [[ -f "$f" ]] || continue
    while read -r pid; do [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true; done <"$f"
  done
fi

# 3. the rest of the control plane.
step "stopping coredns, kube-proxy, kube-apiserver, etcd"
# the apiserver drains for a while on TERM; a throwaway cluster need not wait
STOP_WAIT=3 stop coredns kube-proxy kube-apiserver
stop etcd
for pid in $(pids_mentioning "$STATE/"); do
  log "still running, killing: $({ tr '\0' ' ' </proc/"$pid"/cmdline; } 2>/dev/null | cut -c1-120)"
  stop_pid "$pid" 3
done

# 4. iptables: kube-proxy's own cleanup, then every chain we made.
step "removing the cluster's iptables rules"
if [[ -x "$K8S_BIN/kube-proxy" ]] && ! grep -qE '^:KUBE-' "$STATE/before/iptables" "$STATE/before/ip6tables" 2>/dev/null; then
  "$K8S_BIN/kube-proxy" --cleanup --v=0 >"$STATE/kube-proxy-cleanup.log" 2>&1 || true
fi
for fam in iptables ip6tables; do
  [[ -f "$STATE/before/$fam" ]] && python3 "$CLUSTER_LIB_DIR/iptables-undo.py" undo "$STATE/before/$fam" "$fam" || true
done

# 5. mounts (pod volumes, rootfs, shm, network namespaces), the bridge.
step "unmounting under $STATE, removing $BRIDGE"
umount_all() {
  awk -v s="$STATE/" 'index($2, s) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
    m="$(printf '%b' "$m")" # /proc/mounts escapes spaces as \040
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}
umount_all; umount_all
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  for v in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }'); do
    ip link del "$v" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true   # its address and the service route go with it
fi

# 6. sysctls as they were.
if [[ -f "$STATE/before/sysctl" ]]; then
  while IFS='=' read -r k v; do
    [[ "$(sysctl -n "$k" 2>/dev/null)" == "$v" ]] || sysctl -qw "$k=$v" 2>/dev/null || log "could not restore $k=$v"
  done <"$STATE/before/sysctl"
fi

# 7. cgroups the kubelet made (empty now), files outside STATE.
if [[ -f "$STATE/before/cgroups" && ! -s "$STATE/before/cgroups" ]]; then
  for c in /sys/fs/cgroup/*/kubepods; do
    [[ -d "$c" ]] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
fi
if [[ -d /var/log/containers ]]; then
  find /var/log/containers -maxdepth 1 -type l -lname "$STATE/*" -delete 2>/dev/null || true
  grep -qx /var/log/containers "$STATE/before/paths" 2>/dev/null || rmdir /var/log/containers 2>/dev/null || true
fi
# libcni's cache (containerd 1.6 has no setting for its dir): our network's
# files and the loopback ones that appeared while the cluster ran.
for f in /var/lib/cni/results/"$CNI_NETWORK"-* /var/lib/cni/results/cni-loopback-*; do
  [[ -e "$f" ]] || continue
  grep -qxF "$f" "$STATE/before/cni-results" 2>/dev/null || rm -f "$f"
done
# containerd 1.6 puts shim sockets in /run/containerd/s whatever its state dir
for p in /var/lib/cni/results /var/lib/cni /run/containerd/s /run/containerd; do
  grep -qx "$p" "$STATE/before/paths" 2>/dev/null || rmdir "$p" 2>/dev/null || true
done

# 8. keep the logs of the last run, remove the state.
mkdir -p "$OUT_DIR/last-logs"
rm -f "$OUT_DIR/last-logs/"*.log
cp "$STATE"/*.log "$OUT_DIR/last-logs/" 2>/dev/null || true
before_dir="$(mktemp -d)"
cp -r "$STATE/before/." "$before_dir/" 2>/dev/null || true
rm -rf "$STATE" 2>/dev/null || { umount_all; rm -rf "$STATE"; }

# 9. check.
step "checking that nothing is left"
left=0
procs="$(pids_mentioning "$STATE/"; pids_mentioning "$CONTAINERD_SOCK")"
if [[ -n "$procs" ]]; then
  left=1; echo "LEFT: processes:" >&2
  for p in $procs; do echo "  $p $({ tr '\0' ' ' </proc/"$p"/cmdline; } 2>/dev/null | cut -c1-150)" >&2; done
fi
if grep -qF " $STATE" /proc/self/mounts; then left=1; echo "LEFT: mounts:" >&2; grep -F " $STATE" /proc/self/mounts >&2; fi
if ip link show "$BRIDGE" >/dev/null 2>&1; then left=1; echo "LEFT: interface $BRIDGE" >&2; fi
if ip -o link show type veth 2>/dev/null | grep -q .; then echo "note: veth interfaces exist (not necessarily ours):" >&2; ip -o link show type veth >&2; fi
[[ ! -e "$STATE" ]] || { left=1; echo "LEFT: $STATE" >&2; }
for fam in iptables ip6tables; do
  [[ -f "$before_dir/$fam" ]] || continue
  python3 "$CLUSTER_LIB_DIR/iptables-undo.py" check "$before_dir/$fam" "$fam" >&2 || left=1
done
rm -rf "$before_dir"
if ((left)); then
  step "stopped, but something is left (above)"
  exit 1
fi
step "cluster stopped; nothing left (logs of this run: $OUT_DIR/last-logs)"
