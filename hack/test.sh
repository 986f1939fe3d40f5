#!/usr/bin/env bash
# The project's test command (make test): builds/reuses the control-plane tools, brings
# the local cluster up unless one is already healthy (and takes it down again on exit
# if this run started it), then runs the Rust test suite against it.
#   FLJOB_TEST_KUBECONFIG  admin kubeconfig the tests use (exported here)
#   FLJOB_TOOLS_BIN        dir holding kubectl, helm, ... (exported here)
#   FLJOB_KEEP_CLUSTER=1   leave a cluster this run started running
# Extra arguments are passed to cargo test (before the `--`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

hack/tools.sh >/dev/null

started=0
cleanup() {
  local rc=$?
  if ((started)) && [[ "${FLJOB_KEEP_CLUSTER:-0}" != 1 ]]; then
    echo "[test] taking down the cluster this run started" >&2
    hack/cluster.sh down || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if hack/cluster.sh status >/dev/null 2>&1; then
  echo "[test] reusing the running cluster" >&2
else
  started=1
  hack/cluster.sh up
fi

FLJOB_TEST_KUBECONFIG="$(hack/cluster.sh kubeconfig)"
FLJOB_TOOLS_BIN="${FLJOB_CLUSTER_DIR:-/tmp/fljob-cluster}/bin"
export FLJOB_TEST_KUBECONFIG FLJOB_TOOLS_BIN

cargo test --locked "$@" -- --test-threads=4

# The NVFlare launcher (python/): unit tests with the real nvflare package, and its integration test against this
# cluster and the operator binary cargo just built. It must not skip here.
if (($# == 0)); then
  FLJOB_REQUIRE_CLUSTER=1 FLJOB_OPERATOR_BIN="$ROOT/target/debug/fljob-operator" python/run-tests.sh
fi
