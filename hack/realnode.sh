#!/usr/bin/env bash
# The optional real node of the local cluster: kubelet (built from hack/tools/k8s like the control plane),
# Debian's containerd and runc, images built here (hack/images.sh). Called by hack/cluster.sh when
# FLJOB_REAL_NODES=1; not meant to be run by hand.
#
#   hack/realnode.sh up      start containerd + kubelet as node $FLJOB_REAL_NODE_NAME (needs the control plane up)
#   hack/realnode.sh down    stop them and undo everything they did to the host
#   hack/realnode.sh status  exit 0 when the node is Ready
#
# Everything lives in $FLJOB_CLUSTER_DIR/realnode: containerd's root, state and socket, runc's state, the kubelet's
# root dir, pod logs, certificates, configs, and a record of the host state changed (sysctls, /var/log/containers)
# so that `down` restores it. The node:
#   - is labelled fljob.dev/real-node=true and tainted fljob.dev/real-node=true:NoSchedule (so the kwok suite never
#     lands there); pods select it with that nodeSelector and toleration;
#   - authenticates to the API server with its own client certificate (system:node:<name>, Node authorizer);
#     the API server calls it with a client certificate of its own, and the kubelet checks it (x509 + Webhook
#     authorization, no anonymous access), so `kubectl logs/exec` work;
#   - listens on 127.0.0.1 only; its pods use the host's network through the node's runc wrapper
#     (hack/realnode/runc-hostnet.py): no pod network, no bridge, no route, no iptables rules.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
D="${FLJOB_CLUSTER_DIR:-/tmp/fljob-cluster}"
R="$D/realnode"
NODE="${FLJOB_REAL_NODE_NAME:-real-node-0}"
KUBECONFIG_ADMIN="$D/admin.kubeconfig"
SERVICE_IP="127.96.0.1"
CGROUP_ROOT="/fljob-${NODE}"
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

log() { printf '[realnode] %s\n' "$*" >&2; }
die() { printf '[realnode] ERROR: %s\n' "$*" >&2; exit 1; }
kc() { "$D/bin/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# shellcheck source=hack/lib/daemon.sh
source "$ROOT/hack/lib/daemon.sh"
pid_alive() { daemon_pid "$R" "$1" >/dev/null; }
start_bg() { daemon_start "$R" "$@"; }

stop_pid() { # stop_pid NAME
  local f="$R/run/$1.pid" pid
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if pid_alive "$1"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

wait_for() { # wait_for SECONDS WHAT CMD... (fails at once when the kubelet or containerd has exited)
  local deadline=$((SECONDS + $1)) what="$2" p; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { log "timed out waiting for $what"; return 1; }
    for p in containerd kubelet; do
      if [[ -f "$R/run/$p.pid" ]] && ! pid_alive "$p"; then log "$p exited while waiting for $what"; return 1; fi
    done
    sleep 0.3
  done
}

node_ready() {
  [[ "$(kc get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

# --- host packages ----------------------------------------------------------------------------------------------

install_packages() {
  local want=()
  command -v containerd >/dev/null || want+=(containerd)
  command -v runc >/dev/null || want+=(runc)
  if ((${#want[@]})); then
    log "installing ${want[*]} from Debian (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # The package's systemd unit is not used (no systemd runs here): we start our own containerd.
    apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  fi
}

# --- certificates -----------------------------------------------------------------------------------------------

gen_node_certs() {
  local p="$R/pki" ca="$D/pki"
  mkdir -p "$p"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  sign() { # sign NAME SUBJECT EXT
    openssl req -new "${ec[@]}" -keyout "$p/$1.key" -out "$p/$1.csr" -subj "$2" 2>/dev/null
    printf '%b' "$3" >"$p/$1.ext"
    openssl x509 -req -in "$p/$1.csr" -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial \
      -days 3650 -out "$p/$1.crt" -extfile "$p/$1.ext" 2>/dev/null
    rm -f "$p/$1.csr" "$p/$1.ext"
  }
  # The kubelet's client identity (Node authorizer + NodeRestriction) and its serving certificate.
  sign kubelet-client "/O=system:nodes/CN=system:node:$NODE" \
    'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n'
  sign kubelet-serving "/O=system:nodes/CN=system:node:$NODE" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:$NODE\n"
  chmod 600 "$p"/*.key
}

# --- host state: record before, restore after ----------------------------------------------------------------------

record_host() {
  local s
  : >"$R/host-sysctls"
  for s in "${SYSCTLS[@]}"; do
    [[ -e "/proc/sys/${s//.//}" ]] && printf '%s=%s\n' "$s" "$(cat "/proc/sys/${s//.//}")" >>"$R/host-sysctls"
  done
  : >"$R/host-created"
  # Fixed host paths the kubelet, containerd and libcni use whatever their configured dirs (device-plugin socket,
  # container log links, CNI result cache, shim sockets, netns mounts).
  for s in /var/log/containers /var/log/pods /var/lib/cni /var/lib/kubelet /run/containerd /run/netns; do
    [[ -e "$s" ]] || echo "$s" >>"$R/host-created"
  done
  { ls /run/containerd/s 2>/dev/null || true; } | sort >"$R/host-shim-sockets"
}

restore_host() {
  local line key value
  if [[ -f "$R/host-sysctls" ]]; then
    while IFS='=' read -r key value; do
      [[ -n "$key" ]] || continue
      if [[ "$(cat "/proc/sys/${key//.//}")" != "$value" ]]; then
        echo "$value" >"/proc/sys/${key//.//}"
        log "restored $key=$value"
      fi
    done <"$R/host-sysctls"
  fi
  # Links the kubelet made in /var/log/containers (a fixed path) pointing into our pod log dir.
  local l
  for l in /var/log/containers/*; do
    if [[ -L "$l" && "$(readlink "$l")" == "$R/"* ]]; then rm -f "$l"; fi
  done
  # Shim sockets containerd 1.6 keeps in the fixed /run/containerd/s: ours are the ones that were not there before.
  if [[ -d /run/containerd/s && -f "$R/host-shim-sockets" ]]; then
    comm -13 "$R/host-shim-sockets" <(ls /run/containerd/s | sort) | while read -r s; do rm -f "/run/containerd/s/$s"; done
  fi
  # Folders that did not exist before the node started are the node's: remove them whole.
  if [[ -f "$R/host-created" ]]; then
    while read -r line; do
      [[ -n "$line" && -e "$line" ]] || continue
      rm -rf "$line"
    done <"$R/host-created"
  fi
  # In folders that did exist: the kubelet's device-plugin socket.
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock 2>/dev/null || true
  return 0
}

kill_containers() { # every process in the node's cgroups
  local ctl dir pass
  for pass in 1 2 3; do
    for ctl in /sys/fs/cgroup/*/; do
      dir="${ctl%/}$CGROUP_ROOT"
      [[ -d "$dir" ]] || continue
      { find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null || true; } | sort -u | while read -r pid; do
        kill -KILL "$pid" 2>/dev/null || true
      done
    done
    sleep 0.2
  done
}

make_cgroups() { # the kubelet's --cgroup-root must exist in every v1 hierarchy
  local ctl dir
  for ctl in /sys/fs/cgroup/*/; do
    [[ -f "${ctl}cgroup.procs" ]] || continue
    dir="${ctl%/}$CGROUP_ROOT"
    mkdir -p "$dir"
    if [[ -f "$dir/cpuset.cpus" ]]; then
      cat "${ctl}cpuset.cpus" >"$dir/cpuset.cpus"
      cat "${ctl}cpuset.mems" >"$dir/cpuset.mems"
    fi
  done
}

remove_cgroups() {
  local ctl dir
  for ctl in /sys/fs/cgroup/*/; do
    dir="${ctl%/}$CGROUP_ROOT"
    [[ -d "$dir" ]] || continue
    find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    if [[ -d "$dir" ]]; then log "warning: could not remove cgroup $dir"; fi
  done
  return 0
}

unmount_ours() { # every mount under $R or a netns made for our pods, deepest first
  local m
  for _ in 1 2 3; do
    { awk '{print $5}' /proc/self/mountinfo | sed 's/\\040/ /g' | grep -E "^($R/|/run/netns/cni-|/var/run/netns/cni-)" || true; } | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  rm -f /run/netns/cni-* 2>/dev/null || true
}

# --- up ---------------------------------------------------------------------------------------------------------------

write_configs() {
  local api_port="$1" kubelet_port healthz_port
  read -r kubelet_port healthz_port <<<"$(free_ports 2)"
  local runc_real python
  runc_real="$(command -v runc)"
  python="$(command -v /usr/bin/python3 || command -v python3)"
  mkdir -p "$R"/{bin,cni/bin,cni/net.d,containerd/root,containerd/state,runc,kubelet,pod-logs}
  sed -e "1s|.*|#!$python|" -e "s|@REAL_RUNC@|$runc_real|" -e "s|@SERVICE_HOST@|$SERVICE_IP|" \
    -e "s|@SERVICE_PORT@|443|" -e "s|@APISERVER_HOST@|127.0.0.1|" -e "s|@APISERVER_PORT@|$api_port|" \
    "$ROOT/hack/realnode/runc-hostnet.py" >"$R/bin/runc"
  chmod 755 "$R/bin/runc"
  install -m 755 "$ROOT/hack/realnode/cni-hostnet.sh" "$R/cni/bin/hostnet"
  install -m 755 "$ROOT/hack/realnode/cni-hostnet.sh" "$R/cni/bin/loopback"
  echo '{"cniVersion": "0.4.0", "name": "fljob-hostnet", "plugins": [{"type": "hostnet"}]}' \
    >"$R/cni/net.d/10-hostnet.conflist"
  cat >"$R/containerd.toml" <<TOML
version = 2
root = "$R/containerd/root"
state = "$R/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$R/containerd.sock"
[ttrpc]
  address = "$R/containerd.ttrpc.sock"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # The VM's capability bounding set lacks CAP_SYS_RESOURCE: never lower a score runc cannot set.
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$R/cni/bin"
    conf_dir = "$R/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$R/bin/runc"
        Root = "$R/runc"
        SystemdCgroup = false
TOML
  cat >"$R/kubelet.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: fljob
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $D/pki/ca.crt
users:
- name: system:node:$NODE
  user:
    client-certificate: $R/pki/kubelet-client.crt
    client-key: $R/pki/kubelet-client.key
contexts:
- name: fljob
  context: {cluster: fljob, user: "system:node:$NODE"}
current-context: fljob
KUBECONFIG
  cat >"$R/kubelet-config.yaml" <<KUBELET
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
tlsCertFile: $R/pki/kubelet-serving.crt
tlsPrivateKeyFile: $R/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $D/pki/ca.crt}
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$R/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
failCgroupV1: false
makeIPTablesUtilChains: false
resolvConf: ""
clusterDomain: cluster.local
podLogsDir: $R/pod-logs
# Images are imported, not pulled: never garbage-collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
maxPods: 40
serializeImagePulls: false
registerWithTaints:
- {key: fljob.dev/real-node, value: "true", effect: NoSchedule}
KUBELET
}

cmd_up() {
  [[ -f "$KUBECONFIG_ADMIN" ]] || die "the control plane is not up"
  if pid_alive containerd && pid_alive kubelet && node_ready; then
    log "already up: node $NODE"; return 0
  fi
  [[ -x "$D/bin/kubelet" ]] || die "no kubelet in $D/bin (hack/tools.sh builds it)"
  cmd_down_quiet
  install_packages
  local t0=$SECONDS api_port
  api_port="$(sed -n 's|^ *server: *https://127.0.0.1:||p' "$KUBECONFIG_ADMIN" | head -n1)"
  mkdir -p "$R"/{logs,run}
  record_host
  gen_node_certs
  PAUSE_IMAGE="$("$ROOT/hack/images.sh" ref pause)"
  write_configs "$api_port"
  log "starting containerd ($R/containerd.sock)"
  start_bg containerd containerd --config "$R/containerd.toml"
  wait_for 30 "containerd" ctr --address "$R/containerd.sock" version
  "$ROOT/hack/images.sh" import "$R/containerd.sock" pause busybox >/dev/null
  # The API server's identity as a kubelet client may use the kubelet API (logs, exec, port-forward).
  kc apply -f - >/dev/null <<'RBAC'
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: fljob-apiserver-kubelet-client}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:kubelet-api-admin"}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
RBAC
  make_cgroups
  log "starting kubelet (node $NODE)"
  start_bg kubelet "$D/bin/kubelet" --config="$R/kubelet-config.yaml" --kubeconfig="$R/kubelet.kubeconfig" \
    --hostname-override="$NODE" --root-dir="$R/kubelet" --cert-dir="$R/pki" \
    --node-labels="fljob.dev/real-node=true" --cloud-provider=external --v=1
  wait_for 60 "node $NODE registered" kc get node "$NODE" || { tail -n 30 "$R/logs/kubelet.log" >&2; return 1; }
  # kubelet refuses a loopback --node-ip, and left alone it would publish the host's own interface address. With
  # --cloud-provider=external it publishes none and keeps what "the cloud" sets: we play that part, as a cloud
  # controller manager would: InternalIP 127.0.0.1 (where the API server reaches it), then lift the
  # uninitialized taint.
  kc patch node "$NODE" --subresource=status --type=merge \
    -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"127.0.0.1\"},{\"type\":\"Hostname\",\"address\":\"$NODE\"}]}}" >/dev/null
  kc taint node "$NODE" node.cloudprovider.kubernetes.io/uninitialized- >/dev/null 2>&1 || true
  wait_for 60 "node $NODE Ready" node_ready || { tail -n 30 "$R/logs/kubelet.log" >&2; return 1; }
  log "node $NODE Ready in $((SECONDS - t0))s"
}

cmd_down_quiet() { # each step is best effort: a failed one must not leave the rest undone
  [[ -d "$R" ]] || return 0
  set +e
  stop_pid kubelet
  kill_containers
  # containerd's shims carry our containerd's address on their command line.
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $R/" 2>/dev/null || true
  stop_pid containerd
  unmount_ours
  remove_cgroups
  restore_host
  rm -rf "$R"
  set -e
}

cmd_down() {
  [[ -d "$R" ]] || return 0
  cmd_down_quiet
  if [[ -f "$KUBECONFIG_ADMIN" ]]; then kc delete node "$NODE" --ignore-not-found --wait=false >/dev/null 2>&1 || true; fi
  log "down: node $NODE stopped, host restored"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) pid_alive containerd && pid_alive kubelet && node_ready ;;
  *) sed -n '2,20p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
