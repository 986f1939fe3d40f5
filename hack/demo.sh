#!/usr/bin/env bash
# make demo: a local control plane, the chart installed from this tree, the operator (built from this tree) running
# with exactly the chart's RBAC, and the examples running live.
#   make demo                     kwok only: no image can be pulled here, so the operator runs as a local process
#                                 authenticated with the chart's ServiceAccount token (the chart's Deployment is
#                                 installed with replicaCount=0), and kwok simulates the worker pods
#   FLJOB_REAL_NODES=1 make demo  with the real node: the operator image is built here and the chart's Deployment
#                                 runs it (replicaCount=1, leader election on, Ready through /readyz); the examples
#                                 run as real containers on the real node, the stand-in worker of the busybox image
#                                 doing what each example's sim.fljob.dev/* annotations ask of kwok
#   make demo-down                stop the operator and the cluster
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
D="${FLJOB_CLUSTER_DIR:-/tmp/fljob-cluster}"
NS="${FLJOB_DEMO_NAMESPACE:-fl-site-a}"
PORT="${FLJOB_DEMO_METRICS_PORT:-18080}"
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

if [[ "${1:-}" == down ]]; then
  if [[ -f "$D/run/demo-operator.pid" ]]; then kill "$(cat "$D/run/demo-operator.pid")" 2>/dev/null || true; fi
  exec hack/cluster.sh down
fi

REAL="${FLJOB_REAL_NODES:-0}"
say "Building the control plane tools (first time: ~10 min) and the operator"
hack/tools.sh >/dev/null
cargo build --locked --bin fljob-operator
if [[ "$REAL" == 1 ]]; then
  say "Starting the local cluster (etcd, kube-apiserver, controller-manager, scheduler, kwok nodes, one real node)"
else
  say "Starting the local cluster (etcd, kube-apiserver, controller-manager, scheduler, kwok nodes)"
fi
hack/cluster.sh up
K=("$D/bin/kubectl" --kubeconfig "$D/admin.kubeconfig")
H=("$D/bin/helm" --kubeconfig "$D/admin.kubeconfig")

"${K[@]}" create namespace "$NS" --dry-run=client -o yaml | "${K[@]}" apply -f - >/dev/null
if [[ "$REAL" == 1 ]]; then
  say "Building the images (operator, busybox stand-in worker) and importing them into the real node"
  hack/images.sh import "$D/realnode/containerd.sock" operator busybox >"$D/demo-images"
  OPERATOR_IMAGE="$(awk '$1=="operator"{print $2}' "$D/demo-images")"
  BUSYBOX_IMAGE="$(awk '$1=="busybox"{print $2}' "$D/demo-images")"
  say "Installing the chart into namespace $NS: the operator pod from $OPERATOR_IMAGE on the real node"
  if [[ -f "$D/run/demo-operator.pid" ]]; then kill "$(cat "$D/run/demo-operator.pid")" 2>/dev/null || true; rm -f "$D/run/demo-operator.pid"; fi
  # The real node's pods share the host's network: an old operator pod would hold the metrics port while a rolling
  # update starts the new one. Start from a clean release instead (the CRDs and the jobs' namespace stay).
  "${K[@]}" -n "$NS" delete fljobs --all --wait=true --timeout=60s >/dev/null 2>&1 || true
  "${H[@]}" uninstall fljob-operator -n "$NS" --wait >/dev/null 2>&1 || true
  "${H[@]}" upgrade --install fljob-operator charts/fljob-operator -n "$NS" --wait --timeout 180s \
    --set replicaCount=1 --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE##*:}" \
    --set image.pullPolicy=IfNotPresent --set leaderElection.enabled=true --set metrics.port="$PORT" \
    --set-string 'nodeSelector.fljob\.dev/real-node=true' \
    --set 'tolerations[0].key=fljob.dev/real-node' --set 'tolerations[0].operator=Equal' \
    --set-string 'tolerations[0].value=true' --set 'tolerations[0].effect=NoSchedule' >/dev/null
  "${K[@]}" -n "$NS" get pods -l app.kubernetes.io/name=fljob-operator -o wide
  say "Applying examples/site.yaml and examples/jobs.yaml for the real node (capacity: 2 jobs at a time)"
  "${K[@]}" -n "$NS" delete fljobs --all --wait=true --timeout=60s >/dev/null 2>&1 || true
  # The examples as they are, made to run on this machine's real node: the stand-in worker image, small resources,
  # the node's selector and toleration, and each sim.fljob.dev/* annotation turned into the same behaviour of the
  # stand-in worker (its --set options).
  python3 hack/realnode/examples.py --image "$BUSYBOX_IMAGE" examples/site.yaml examples/jobs.yaml | "${K[@]}" -n "$NS" apply -f -
else
  say "Installing the chart into namespace $NS (CRDs, RBAC, ServiceAccount; replicaCount=0, see above)"
  "${H[@]}" upgrade --install fljob-operator charts/fljob-operator -n "$NS" --set replicaCount=0 --wait >/dev/null
  "${K[@]}" wait --for=condition=Established crd/fljobs.fljob.dev crd/flsites.fljob.dev >/dev/null

  say "Running the operator as the chart's ServiceAccount (log: $D/logs/demo-operator.log)"
  if [[ -f "$D/run/demo-operator.pid" ]]; then kill "$(cat "$D/run/demo-operator.pid")" 2>/dev/null || true; fi
  hack/cluster.sh sa-kubeconfig "$NS" fljob-operator "$D/demo-operator.kubeconfig" >/dev/null
  KUBECONFIG="$D/demo-operator.kubeconfig" setsid target/debug/fljob-operator run --namespace "$NS" \
    --metrics-addr "127.0.0.1:$PORT" >"$D/logs/demo-operator.log" 2>&1 </dev/null &
  echo $! >"$D/run/demo-operator.pid"
  for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

  say "Applying examples/site.yaml and examples/jobs.yaml (capacity: 2 jobs at a time)"
  "${K[@]}" -n "$NS" delete fljobs --all --wait=true --timeout=60s >/dev/null 2>&1 || true
  "${K[@]}" -n "$NS" apply -f examples/site.yaml -f examples/jobs.yaml
fi

say "Watching the jobs (long-training runs until it is aborted; the demo aborts it after ~10 s)"
aborted=0
finished=0
for i in $(seq 90); do
  printf '\033[2m--- %ss ---\033[0m\n' "$((i * 2))"
  "${K[@]}" -n "$NS" get flj
  phases="$("${K[@]}" -n "$NS" get flj -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}')"
  if ((!aborted && i >= 5)); then
    echo "  -> kubectl patch flj long-training --type merge -p '{\"spec\":{\"abort\":true}}'"
    "${K[@]}" -n "$NS" patch flj long-training --type merge -p '{"spec":{"abort":true}}' >/dev/null
    aborted=1
  fi
  if [[ "$(grep -cE '^(Succeeded|Failed|Aborted)$' <<<"$phases")" == 3 ]]; then finished=1; break; fi
  sleep 2
done
"${K[@]}" -n "$NS" get fls
if [[ "$REAL" == 1 ]]; then
  "${K[@]}" -n "$NS" get pods -o wide -L fljob.dev/job
  LOG_HINT="kubectl -n $NS logs deploy/fljob-operator"
else
  LOG_HINT="$D/logs/demo-operator.log"
fi
if ((!finished)); then
  echo "The jobs did not all finish within 3 minutes; the operator's log: $LOG_HINT" >&2
  exit 1
fi

cat <<MSG

$(printf '\033[1m')All three jobs finished: one Succeeded, one Failed with NVFlare's 102 (UnsafeComponent), one Aborted.$(printf '\033[0m')
Look around:
  export KUBECONFIG=$D/admin.kubeconfig PATH=$D/bin:\$PATH
  kubectl -n $NS get flj,fls                     # jobs and the site's quota pool
  kubectl -n $NS get flj -o wide                 # job ids and pod names too
  kubectl -n $NS describe flj unsafe-component   # conditions and Events
  kubectl -n $NS get flj long-training -o jsonpath='{.status.abort}'
  kubectl -n $NS get pods -L fljob.dev/job
  curl -s http://127.0.0.1:$PORT/metrics | grep ^fljob_
  kubectl -n $NS apply -f examples/jobs.yaml      # after deleting them, to run them again
Operator log: $LOG_HINT
Tear down:    make demo-down
MSG
