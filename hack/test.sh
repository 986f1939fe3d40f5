#!/usr/bin/env bash
# The project's test command (make test): builds/reuses the control-plane tools, brings
# the local cluster up unless one is already healthy (and takes it down again on exit
# if this run started it), then runs the Rust test suite against it.
#   FLJOB_TEST_KUBECONFIG  admin kubeconfig the tests use (exported here)
#   FLJOB_TOOLS_BIN        dir holding kubectl, helm, ... (exported here)
#   FLJOB_KEEP_CLUSTER=1   leave a cluster this run started running
#   FLJOB_REAL_NODES       1 (default): the cluster gets its real node (kubelet + containerd + runc), the images are
#                          built and imported (hack/images.sh), and the real-node tests run; 0: kwok only, and the
#                          real-node tests say they did not run
# When this run starts the cluster with a real node, it snapshots the host first (hack/host-state.sh) and, after
# taking the cluster down, fails if anything the node changed on the host is left over.
# Extra arguments are passed to cargo test (before the `--`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

hack/tools.sh >/dev/null
# Lua 5.1 + cjson run the Argo CD health check (examples/gitops/argocd-health.lua) in tests/operator.rs.
if ! command -v lua5.1 >/dev/null || ! lua5.1 -e 'require("cjson")' 2>/dev/null; then
  echo "[test] installing lua5.1 and lua-cjson (Debian) for the Argo CD health check test" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lua5.1 lua-cjson >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lua5.1 lua-cjson >/dev/null; }
fi
export FLJOB_REAL_NODES="${FLJOB_REAL_NODES:-1}"
D="${FLJOB_CLUSTER_DIR:-/tmp/fljob-cluster}"
SNAP="$(mktemp -d)"

started=0
cleanup() {
  local rc=$?
  if ((started)) && [[ "${FLJOB_KEEP_CLUSTER:-0}" != 1 ]]; then
    echo "[test] taking down the cluster this run started" >&2
    hack/cluster.sh down || true
    if [[ -f "$SNAP/before" ]]; then
      hack/host-state.sh >"$SNAP/after"
      # Anything there now that was not there before (a changed sysctl shows as its new value) is a leftover.
      comm -13 "$SNAP/before" "$SNAP/after" >"$SNAP/left"
      if [[ ! -s "$SNAP/left" ]]; then
        echo "[test] host check: after cluster-down nothing of the cluster or its real node is left on the host ($(wc -l <"$SNAP/before") items compared)" >&2
      else
        echo "[test] host check FAILED: cluster-down left these on the host:" >&2
        cat "$SNAP/left" >&2
        ((rc != 0)) || rc=1
      fi
    fi
  fi
  rm -rf "$SNAP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if FLJOB_REAL_NODES=0 hack/cluster.sh status >/dev/null 2>&1; then
  echo "[test] reusing the running cluster" >&2
  [[ "$FLJOB_REAL_NODES" != 1 ]] || hack/cluster.sh up
else
  started=1
  [[ "$FLJOB_REAL_NODES" != 1 ]] || hack/host-state.sh >"$SNAP/before"
  hack/cluster.sh up
fi
if [[ "$FLJOB_REAL_NODES" == 1 ]]; then
  # The images the real-node tests run, built here (cached by content) and imported into the node's containerd.
  t0=$SECONDS
  hack/images.sh import "$D/realnode/containerd.sock" busybox worker operator >"$SNAP/images"
  while read -r name ref _; do
    export "FLJOB_IMAGE_${name^^}=$ref"
  done <"$SNAP/images"
  export FLJOB_REAL_NODE="${FLJOB_REAL_NODE_NAME:-real-node-0}"
  export FLJOB_REQUIRE_REAL_NODE=1   # python/tests/test_e2e.py must run, not skip
  echo "[test] real node $FLJOB_REAL_NODE; images ready in $((SECONDS - t0))s: $FLJOB_IMAGE_BUSYBOX $FLJOB_IMAGE_WORKER $FLJOB_IMAGE_OPERATOR" >&2
fi

FLJOB_TEST_KUBECONFIG="$(hack/cluster.sh kubeconfig)"
FLJOB_TOOLS_BIN="${FLJOB_CLUSTER_DIR:-/tmp/fljob-cluster}/bin"
export FLJOB_TEST_KUBECONFIG FLJOB_TOOLS_BIN

cargo test --locked "$@" -- --test-threads=4

if (($# == 0)); then
  # The scale benchmark's smoke (issue 12): N = 100 in a debug build; it fails only if a figure is missing (the
  # numbers themselves are `make bench`'s business, not a test's).
  cargo test --locked --bench scale
fi

# The NVFlare launcher (python/): unit tests with the real nvflare package, and its integration test against this
# cluster and the operator binary cargo just built. It must not skip here.
if (($# == 0)); then
  FLJOB_REQUIRE_CLUSTER=1 FLJOB_OPERATOR_BIN="$ROOT/target/debug/fljob-operator" python/run-tests.sh
fi
