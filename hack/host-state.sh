#!/usr/bin/env bash
# Prints what the real node can change on this host, one line per item, sorted, so two snapshots diff cleanly:
# mounts, cgroups (two levels under each controller), the sysctls kubelet sets, the fixed paths kubelet and
# containerd use, network links, addresses, routes and firewall rules, and the node's processes.
#   hack/host-state.sh > before; ...; hack/host-state.sh > after; diff before after
set -uo pipefail
{
  awk '{print "mount " $5 " " $9}' /proc/self/mountinfo
  # (process_api/ is this machine's own per-command cgroups, which come and go with every command run here)
  for c in /sys/fs/cgroup/*/; do
    find "$c" -mindepth 1 -maxdepth 2 -type d 2>/dev/null | { grep -v '/process_api' || true; } | sed 's/^/cgroup /'
  done
  for s in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward; do
    echo "sysctl $s=$(cat "/proc/sys/$s" 2>/dev/null)"
  done
  for p in /var/log/containers /var/log/pods /var/lib/cni /var/lib/kubelet /run/containerd /run/netns /etc/cni /opt/cni; do
    if [[ -e "$p" ]]; then find "$p" -maxdepth 3 2>/dev/null | sed 's/^/path /'; else echo "path $p (absent)"; fi
  done
  ip -o link 2>/dev/null | awk '{print "link " $2}'
  ip -o addr 2>/dev/null | awk '{print "addr " $2 " " $4}'
  ip route show table all 2>/dev/null | sed 's/^/route /'
  if command -v iptables-save >/dev/null; then iptables-save 2>/dev/null | { grep -v '^#' || true; } | sed 's/\[[0-9:]*\]//' | sed 's/^/iptables /'; fi
  ps -eo comm= | grep -E '^(kubelet|containerd|containerd-shim|runc|pause)' | sed 's/^/process /'
  true # a listing that found nothing is not a failure
} | sort
