#!/usr/bin/env bash
# A real local Kubernetes control plane for tests: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler (built by hack/tools.sh) and kwok managing
# fake nodes. Everything binds to 127.0.0.1 on free ports chosen at start.
#
#   hack/cluster.sh up                     start (a no-op when already up and healthy)
#   hack/cluster.sh down                   stop every process and remove the state dir
#   hack/cluster.sh status                 show the components; exit 0 only when healthy
#   hack/cluster.sh kubeconfig             print the admin kubeconfig path
#   hack/cluster.sh sa-kubeconfig NAMESPACE SERVICEACCOUNT OUTFILE
#                                          write a kubeconfig authenticating as that
#                                          ServiceAccount (token from `kubectl create token`)
#   hack/cluster.sh stop COMPONENT [SIGNAL]  stop one component (etcd, kube-apiserver, kwok, ...;
#                                          SIGTERM by default, e.g. KILL for a crash)
#   hack/cluster.sh start COMPONENT        start it again with the same command line, and wait
#                                          until it is healthy (for chaos tests)
#
# Environment:
#   FLJOB_CLUSTER_DIR  state dir (default /tmp/fljob-cluster): logs, pid files, certs,
#                      kubeconfigs, etcd data; $FLJOB_CLUSTER_DIR/bin -> the tools bin dir
#   FLJOB_NODES        number of fake nodes (default 4)
#   FLJOB_REAL_NODES=1 also run one real node (kubelet + containerd + runc, hack/realnode.sh) next to them;
#                      `up` on a running cluster adds it, `down` removes it and restores the host
#   FLJOB_SA_TOKEN_DURATION  lifetime of sa-kubeconfig tokens (default 24h)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
D="${FLJOB_CLUSTER_DIR:-/tmp/fljob-cluster}"
NODES="${FLJOB_NODES:-4}"
KUBECONFIG_ADMIN="$D/admin.kubeconfig"
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
# Only loopback addresses anywhere: the Service range and kwok's pod IPs are in
# 127.0.0.0/8 too (nothing connects to them; they are fields in status).
SERVICE_CIDR="127.96.0.0/16"
KUBERNETES_SVC_IP="127.96.0.1"
POD_CIDR="127.64.0.0/16"
SA_ISSUER="https://kubernetes.default.svc.cluster.local"

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# --- process bookkeeping --------------------------------------------------------------

# shellcheck source=hack/lib/daemon.sh
source "$ROOT/hack/lib/daemon.sh"
pid_of() { daemon_pid "$D" "$1"; }
start_bg() { daemon_start "$D" "$@"; }

stop_all() {
  local name pid pids=()
  [[ -d "$D/run" ]] || return 0
  # reverse order: kwok, scheduler, controller-manager, apiserver, etcd
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name="${COMPONENTS[$i]}"
    if pid="$(pid_of "$name")"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + 15))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid did not stop on SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  done
}

# --- helpers ----------------------------------------------------------------------------

kc() { "$D/bin/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

api_url() { sed -n 's/^ *server: *//p' "$KUBECONFIG_ADMIN" | head -n1; }

api_ready() {
  [[ -f "$KUBECONFIG_ADMIN" ]] || return 1
  curl -fsS --max-time 3 --cacert "$D/pki/ca.crt" "$(api_url)/readyz" >/dev/null 2>&1
}

wait_for() { # wait_for SECONDS DESCRIPTION COMPONENT-OR-"" CMD... (COMPONENT must stay alive)
  local timeout="$1" what="$2" comp="$3"; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [[ -n "$comp" ]] && ! pid_of "$comp" >/dev/null; then
      log "$comp exited while waiting for $what; last log lines:"
      tail -n 30 "$D/logs/$comp.log" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "timed out after ${timeout}s waiting for $what"
      [[ -n "$comp" ]] && tail -n 30 "$D/logs/$comp.log" >&2
      return 1
    fi
    sleep 0.3
  done
}

# --- certificates & kubeconfigs ---------------------------------------------------------

gen_certs() {
  local p="$D/pki"
  mkdir -p "$p"
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout "$p/ca.key" -out "$p/ca.crt" -days 3650 \
    -subj "/CN=fljob-test-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  # sign NAME SUBJECT EXTENSIONS
  sign() {
    openssl req -new "${ec[@]}" -keyout "$p/$1.key" -out "$p/$1.csr" -subj "$2" 2>/dev/null
    printf '%b' "$3" >"$p/$1.ext"
    openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
      -days 3650 -out "$p/$1.crt" -extfile "$p/$1.ext" 2>/dev/null
    rm -f "$p/$1.csr" "$p/$1.ext"
  }
  local client='basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n'
  sign apiserver "/CN=kube-apiserver" \
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:${KUBERNETES_SVC_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
  sign admin "/O=system:masters/CN=fljob-admin" "$client"
  sign controller-manager "/CN=system:kube-controller-manager" "$client"
  sign scheduler "/CN=system:kube-scheduler" "$client"
  sign kwok "/O=system:masters/CN=kwok" "$client"
  # The API server's identity when it calls a kubelet (logs, exec); the real node's kubelet authorizes it.
  sign apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client" "$client"
  # service-account token signing key pair
  openssl ecparam -name prime256v1 -genkey -noout -out "$p/sa.key" 2>/dev/null
  openssl ec -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
  chmod 600 "$p"/*.key
}

b64() { base64 -w0 <"$1"; }

write_kubeconfig() { # write_kubeconfig FILE SERVER USER-NAME (cert/key = pki/NAME.crt/.key)
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fljob
  cluster:
    server: $2
    certificate-authority-data: $(b64 "$D/pki/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $(b64 "$D/pki/$3.crt")
    client-key-data: $(b64 "$D/pki/$3.key")
contexts:
- name: fljob
  context:
    cluster: fljob
    user: $3
current-context: fljob
EOF
  chmod 600 "$1"
}

# --- fake nodes ---------------------------------------------------------------------------

nodes_yaml() {
  local i
  for ((i = 0; i < NODES; i++)); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
spec: {}
status:
  addresses:
  - type: InternalIP
    address: 127.0.0.1
  - type: Hostname
    address: kwok-node-$i
  capacity: &res
    cpu: "32"
    memory: 256Gi
    pods: "110"
    nvidia.com/gpu: "8"
    ephemeral-storage: 1Ti
  allocatable: *res
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
EOF
  done
}

nodes_ready() {
  local n
  n="$(kc get nodes -l type=kwok -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c '^True$' || true)"
  ((n >= NODES))
}

default_sa_exists() { kc -n default get serviceaccount default; }

# --- health -------------------------------------------------------------------------------

healthy() {
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || return 1; done
  api_ready || return 1
  [[ -x "$D/bin/kubectl" ]] || return 1
  nodes_ready
}

# --- subcommands --------------------------------------------------------------------------

take_lock() { # serialise up/down on one state dir; $1 = what to do on timeout (die|warn)
  mkdir -p "$(dirname "$D")"
  exec 8>"$D.lock"
  if ! flock -w 120 8; then
    [[ "$1" == warn ]] || die "could not lock $D.lock within 120s (another up/down running?)"
    log "warning: could not lock $D.lock within 120s; going on without it"
  fi
}

real_nodes() { [[ "${FLJOB_REAL_NODES:-0}" == 1 ]]; }

cmd_up() {
  if [[ -d "$D" ]] && healthy; then
    log "already up ($(api_url)); admin kubeconfig: $KUBECONFIG_ADMIN"
    if real_nodes; then "$ROOT/hack/realnode.sh" up; fi
    return 0
  fi
  # Build (or find) the tools before taking the lock: a cold build takes minutes.
  local bin
  bin="$("$ROOT/hack/tools.sh" | tail -n1)"
  [[ -x "$bin/kube-apiserver" ]] || die "tools build did not produce $bin/kube-apiserver"
  take_lock die
  if [[ -d "$D" ]] && healthy; then
    log "already up ($(api_url)); admin kubeconfig: $KUBECONFIG_ADMIN"
    if real_nodes; then "$ROOT/hack/realnode.sh" up; fi
    return 0
  fi
  if [[ -e "$D" ]]; then
    log "found a stale or broken cluster in $D; cleaning it up first"
    "$ROOT/hack/realnode.sh" down || true
    stop_all
    rm -rf "$D"
  fi
  command -v openssl >/dev/null || die "openssl is required (apt-get install -y openssl)"
  command -v curl >/dev/null || die "curl is required (apt-get install -y curl)"
  [[ "$NODES" =~ ^[0-9]+$ ]] && ((NODES >= 1)) || die "FLJOB_NODES must be a positive integer"

  local t0=$SECONDS
  mkdir -p "$D"/{logs,run,etcd}
  chmod 700 "$D" "$D/etcd"
  rm -rf "${D}.failed-logs"
  ln -sfn "$bin" "$D/bin"
  # from here on, a failure tears everything down again
  trap 'rc=$?; if ((rc != 0)); then log "up failed; tearing down (logs kept in ${D}.failed-logs)"; rm -rf "${D}.failed-logs"; cp -r "$D/logs" "${D}.failed-logs" 2>/dev/null || true; cp -r "$D/realnode/logs" "${D}.failed-logs/realnode" 2>/dev/null || true; "$ROOT/hack/realnode.sh" down || true; stop_all; rm -rf "$D"; fi' EXIT

  local ports etcd_port peer_port api_port
  read -r etcd_port peer_port api_port <<<"$(free_ports 3)"
  local api="https://127.0.0.1:$api_port"
  gen_certs
  write_kubeconfig "$KUBECONFIG_ADMIN" "$api" admin
  write_kubeconfig "$D/controller-manager.kubeconfig" "$api" controller-manager
  write_kubeconfig "$D/scheduler.kubeconfig" "$api" scheduler
  write_kubeconfig "$D/kwok.kubeconfig" "$api" kwok
  cp "$ROOT/hack/kwok/stages.yaml" "$D/kwok-stages.yaml"
  cp "$ROOT/hack/kwok/unschedulable-policy.yaml" "$D/unschedulable-policy.yaml"

  log "starting etcd on 127.0.0.1:$etcd_port"
  start_bg etcd "$D/bin/etcd" --name fljob --data-dir "$D/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "fljob=http://127.0.0.1:$peer_port" --initial-cluster-state new \
    --unsafe-no-fsync=true --log-level=warn --quota-backend-bytes=4294967296
  wait_for 30 "etcd health" etcd curl -fsS --max-time 2 "http://127.0.0.1:$etcd_port/health"

  log "starting kube-apiserver on $api"
  start_bg kube-apiserver "$D/bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
    --cert-dir="$D/pki" --tls-cert-file="$D/pki/apiserver.crt" --tls-private-key-file="$D/pki/apiserver.key" \
    --client-ca-file="$D/pki/ca.crt" \
    --service-account-issuer="$SA_ISSUER" \
    --service-account-key-file="$D/pki/sa.pub" --service-account-signing-key-file="$D/pki/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    --kubelet-preferred-address-types=InternalIP \
    --kubelet-client-certificate="$D/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$D/pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$D/pki/ca.crt" \
    --feature-gates=MutatingAdmissionPolicy=true \
    --runtime-config=admissionregistration.k8s.io/v1beta1=true \
    --profiling=false --event-ttl=1h
  wait_for 90 "kube-apiserver /readyz" kube-apiserver api_ready

  log "starting kube-controller-manager and kube-scheduler"
  start_bg kube-controller-manager "$D/bin/kube-controller-manager" \
    --kubeconfig="$D/controller-manager.kubeconfig" \
    --secure-port=0 --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$D/pki/sa.key" \
    --root-ca-file="$D/pki/ca.crt" \
    --cluster-signing-cert-file="$D/pki/ca.crt" --cluster-signing-key-file="$D/pki/ca.key" \
    --controllers='*' \
    --service-cluster-ip-range="$SERVICE_CIDR" --allocate-node-cidrs=false \
    --kube-api-qps=100 --kube-api-burst=200 \
    --profiling=false
  cat >"$D/scheduler-config.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: $D/scheduler.kubeconfig
  qps: 100
  burst: 200
leaderElection:
  leaderElect: false
EOF
  start_bg kube-scheduler "$D/bin/kube-scheduler" --config="$D/scheduler-config.yaml" \
    --secure-port=0 --leader-elect=false --profiling=false

  log "starting kwok ($NODES fake nodes)"
  start_bg kwok "$D/bin/kwok" --kubeconfig="$D/kwok.kubeconfig" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-ip=127.0.0.1 --cidr="$POD_CIDR" --node-lease-duration-seconds=40 \
    -c "$D/kwok-stages.yaml"
  nodes_yaml | kc apply -f - >/dev/null
  kc apply -f "$D/unschedulable-policy.yaml" >/dev/null

  wait_for 60 "$NODES Ready nodes" kwok nodes_ready
  wait_for 60 "the default ServiceAccount (controller-manager)" kube-controller-manager default_sa_exists
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || die "$c is not running (see $D/logs/$c.log)"; done

  cat >"$D/env" <<EOF
export FLJOB_TEST_KUBECONFIG=$KUBECONFIG_ADMIN
export FLJOB_TOOLS_BIN=$D/bin
export KUBECONFIG=$KUBECONFIG_ADMIN
EOF
  if real_nodes; then "$ROOT/hack/realnode.sh" up; fi
  trap - EXIT
  log "up in $((SECONDS - t0))s: $api, $NODES nodes; admin kubeconfig: $KUBECONFIG_ADMIN (source $D/env)"
}

cmd_down() {
  take_lock warn
  if [[ ! -e "$D" ]]; then
    rm -rf "${D}.failed-logs"
    log "nothing to do: $D does not exist"
    return 0
  fi
  "$ROOT/hack/realnode.sh" down || log "warning: the real node's teardown reported an error"
  stop_all
  rm -rf "$D" "${D}.failed-logs"
  rm -f "$D.lock"
  log "down: stopped all components and removed $D"
}

cmd_status() {
  if [[ ! -d "$D" ]]; then
    echo "cluster: down ($D does not exist)"
    return 1
  fi
  local c pid ok=0
  for c in "${COMPONENTS[@]}"; do
    if pid="$(pid_of "$c")"; then printf '%-24s running (pid %s)\n' "$c" "$pid"; else printf '%-24s NOT RUNNING (log: %s)\n' "$c" "$D/logs/$c.log"; ok=1; fi
  done
  if api_ready; then echo "apiserver                $(api_url) ready"; else echo "apiserver                not ready"; ok=1; fi
  if [[ -d "$D/realnode" ]] || real_nodes; then
    if "$ROOT/hack/realnode.sh" status; then echo "real node                Ready"; else echo "real node                NOT READY (logs: $D/realnode/logs)"; ok=1; fi
  fi
  if [[ -x "$D/bin/kubectl" ]] && api_ready; then
    kc get nodes -o wide 2>/dev/null || true
    nodes_ready || ok=1
  fi
  echo "admin kubeconfig         $KUBECONFIG_ADMIN"
  echo "tools                    $D/bin -> $(readlink "$D/bin" 2>/dev/null || echo '?')"
  if ((ok == 0)); then echo "cluster: healthy"; else echo "cluster: UNHEALTHY"; fi
  return "$ok"
}

cmd_kubeconfig() {
  [[ -f "$KUBECONFIG_ADMIN" ]] || log "warning: the cluster is not up (run: make cluster-up)"
  echo "$KUBECONFIG_ADMIN"
}

cmd_sa_kubeconfig() {
  (($# == 3)) || die "usage: $0 sa-kubeconfig NAMESPACE SERVICEACCOUNT OUTFILE"
  local ns="$1" sa="$2" out="$3" token
  api_ready || die "the cluster is not up (run: make cluster-up)"
  token="$(kc -n "$ns" create token "$sa" --duration="${FLJOB_SA_TOKEN_DURATION:-24h}")"
  mkdir -p "$(dirname "$out")"
  local tmp
  tmp="$(mktemp "$out.XXXXXX")"
  cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fljob
  cluster:
    server: $(api_url)
    certificate-authority-data: $(b64 "$D/pki/ca.crt")
users:
- name: system:serviceaccount:$ns:$sa
  user:
    token: $token
contexts:
- name: fljob
  context:
    cluster: fljob
    namespace: $ns
    user: system:serviceaccount:$ns:$sa
current-context: fljob
EOF
  chmod 600 "$tmp"
  mv -f "$tmp" "$out"
  log "wrote $out (ServiceAccount $ns/$sa)"
}

known_component() { local c; for c in "${COMPONENTS[@]}"; do [[ "$c" == "$1" ]] && return 0; done; return 1; }

cmd_stop() {
  (($# >= 1)) && known_component "$1" || die "usage: $0 stop COMPONENT [SIGNAL]; COMPONENT is one of: ${COMPONENTS[*]}"
  local pid
  pid="$(pid_of "$1")" || { log "$1 is not running"; return 0; }
  kill -"${2:-TERM}" "$pid"
  local deadline=$((SECONDS + 15))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  log "stopped $1 (pid $pid)"
}

cmd_start() {
  (($# == 1)) && known_component "$1" || die "usage: $0 start COMPONENT; COMPONENT is one of: ${COMPONENTS[*]}"
  [[ -f "$D/run/$1.cmd" ]] || die "no recorded command line for $1 (was the cluster started by this version?)"
  if pid_of "$1" >/dev/null; then log "$1 is already running"; return 0; fi
  # kwok reads its Stages at start: pick up edits of hack/kwok/stages.yaml.
  [[ "$1" != kwok ]] || cp "$ROOT/hack/kwok/stages.yaml" "$D/kwok-stages.yaml"
  local -a argv
  eval "argv=($(cat "$D/run/$1.cmd"))"
  # The log of the earlier run is kept next to the new one.
  [[ ! -f "$D/logs/$1.log" ]] || mv -f "$D/logs/$1.log" "$D/logs/$1.log.$(date +%s)"
  start_bg "$1" "${argv[@]}"
  case "$1" in
    etcd) wait_for 30 "etcd health" etcd curl -fsS --max-time 2 "$(grep -o 'http://127.0.0.1:[0-9]*' "$D/run/etcd.cmd" | head -n1)/health" ;;
    kube-apiserver) wait_for 90 "kube-apiserver /readyz" kube-apiserver api_ready ;;
    *) sleep 1; pid_of "$1" >/dev/null || die "$1 did not stay up (see $D/logs/$1.log)" ;;
  esac
  log "started $1 (pid $(pid_of "$1"))"
}

case "${1:-}" in
  up) cmd_up ;;
  stop) shift; cmd_stop "$@" ;;
  start) shift; cmd_start "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kubeconfig) cmd_kubeconfig ;;
  sa-kubeconfig) shift; cmd_sa_kubeconfig "$@" ;;
  -h|--help|help) sed -n '2,25p' "${BASH_SOURCE[0]}" ;;
  *) sed -n '2,25p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
