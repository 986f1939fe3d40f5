#!/usr/bin/env bash
# Builds the pinned local control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kubelet for the optional real node, etcd, kwok, helm) from the Go modules under hack/tools/
# into a cache directory keyed by the pinned versions, and prints that directory.
#
#   hack/tools.sh                  build what is missing; the bin dir is the last stdout line
#   hack/tools.sh --print-bin-dir  print the bin dir only (builds nothing)
#   hack/tools.sh --check          exit 0 if every binary is present, 1 otherwise
#
# Progress goes to stderr, so `BIN=$(hack/tools.sh)` works. A second run costs nothing.
# The cache root is ${FLJOB_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fljob-operator}.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/hack/tools"

log() { printf '[tools] %s\n' "$*" >&2; }
die() { printf '[tools] ERROR: %s\n' "$*" >&2; exit 1; }

# version_of MODULE_DIR MODULE_PATH -> vX.Y.Z as pinned in that go.mod (require line)
version_of() {
  local v
  v="$(awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == "require") ? $3 : $2; exit }' "$1/go.mod")"
  [[ -n "$v" ]] || die "cannot find $2 in $1/go.mod"
  printf '%s' "$v"
}

K8S_VERSION="$(version_of "$TOOLS/k8s" k8s.io/kubernetes)"
ETCD_VERSION="$(version_of "$TOOLS/etcd" go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(version_of "$TOOLS/kwok" sigs.k8s.io/kwok)"
HELM_VERSION="$(version_of "$TOOLS/helm" helm.sh/helm/v4)"

# A short digest of the pinning files, so any change to a go.mod/go.sum (or to the
# build recipe below, bump RECIPE) lands in a fresh directory.
RECIPE=1
DIGEST="$(cat "$TOOLS"/{k8s,etcd,kwok,helm}/go.{mod,sum} <(echo "recipe=$RECIPE") | sha256sum | cut -c1-8)"
KEY="k8s-${K8S_VERSION#v}_etcd-${ETCD_VERSION#v}_kwok-${KWOK_VERSION#v}_helm-${HELM_VERSION#v}_${DIGEST}"
CACHE_ROOT="${FLJOB_TOOLS_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/fljob-operator}"
BIN="$CACHE_ROOT/$KEY/bin"

K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)

missing() { # names of the binaries not yet in $BIN
  local b
  for b in "${K8S_BINS[@]}" etcd kwok helm; do
    [[ -x "$BIN/$b" ]] || printf '%s\n' "$b"
  done
}

case "${1:-}" in
  --print-bin-dir) echo "$BIN"; exit 0 ;;
  --check) [[ -z "$(missing)" ]]; exit $? ;;
  "" ) ;;
  -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) die "unknown argument: $1" ;;
esac

if [[ -z "$(missing)" ]]; then
  log "all tools present in $BIN"
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || die "go is not installed (need go >= 1.26 for etcd ${ETCD_VERSION})"
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="${GOFLAGS:-} -mod=readonly"

mkdir -p "$CACHE_ROOT/$KEY"
# One build at a time per version key (parallel `make test` runs share the cache).
exec 9>"$CACHE_ROOT/$KEY/.lock"
if ! flock -n 9; then
  log "another build holds $CACHE_ROOT/$KEY/.lock; waiting for it"
  flock 9
fi
mkdir -p "$BIN"
STAGE="$(mktemp -d "$CACHE_ROOT/$KEY/stage.XXXXXX")"
HEARTBEAT_PID=""
cleanup() {
  [[ -n "$HEARTBEAT_PID" ]] && kill "$HEARTBEAT_PID" 2>/dev/null || true
  rm -rf "$STAGE"
}
trap cleanup EXIT

# build NAME MODULE_DIR LDFLAGS PACKAGE... : go build into $STAGE, then move into $BIN
build() {
  local name="$1" dir="$2" ldflags="$3"; shift 3
  local logf="$CACHE_ROOT/$KEY/build-$name.log" start=$SECONDS
  log "building $name (log: $logf)"
  ( while sleep 30; do log "  ... still building $name ($((SECONDS - start))s)"; done ) &
  HEARTBEAT_PID=$!
  if ! (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$STAGE/" "$@") >"$logf" 2>&1; then
    kill "$HEARTBEAT_PID" 2>/dev/null || true; HEARTBEAT_PID=""
    tail -n 40 "$logf" >&2
    die "building $name failed (full log: $logf)"
  fi
  kill "$HEARTBEAT_PID" 2>/dev/null || true; wait "$HEARTBEAT_PID" 2>/dev/null || true; HEARTBEAT_PID=""
  local f
  for f in "$STAGE"/*; do mv -f "$f" "$BIN/"; done
  log "built $name in $((SECONDS - start))s"
}

need() { missing | grep -qx "$1"; }
TOTAL_START=$SECONDS

if need kube-apiserver || need kube-controller-manager || need kube-scheduler || need kubectl || need kubelet; then
  # Stamp the version like upstream's hack/lib/version.sh does; without it the server
  # reports v0.0.0-master+$Format:%H$, which breaks helm kubeVersion checks.
  minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  # The proxy's module zip carries no git commit; record where the source came from.
  commit="gomod-k8s.io/kubernetes@${K8S_VERSION}"
  build_date="$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" 2>/dev/null \
    | sed -n 's/.*"Time": *"\([^"]*\)".*/\1/p' | head -n1)"
  [[ -n "$build_date" ]] || build_date="1970-01-01T00:00:00Z"
  ld="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ld+=" -X $pkg.gitVersion=${K8S_VERSION} -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor}"
    ld+=" -X $pkg.gitCommit=${commit} -X $pkg.gitTreeState=clean -X $pkg.buildDate=${build_date}"
  done
  log "kubernetes ${K8S_VERSION}: a cold build takes a long time on 2 cores (tens of minutes)"
  build kubernetes "$TOOLS/k8s" "$ld" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet
fi

if need etcd; then
  build etcd "$TOOLS/etcd" "-s -w" go.etcd.io/etcd/server/v3
  # go names the binary of .../server/v3 "server".
  [[ -x "$BIN/server" ]] && mv -f "$BIN/server" "$BIN/etcd"
  [[ -x "$BIN/etcd" ]] || die "etcd binary missing after build"
fi

if need kwok; then
  build kwok "$TOOLS/kwok" "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" sigs.k8s.io/kwok/cmd/kwok
fi

if need helm; then
  build helm "$TOOLS/helm" "-s -w -X helm.sh/helm/v4/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v4/internal/version.gitTreeState=clean" \
    helm.sh/helm/v4/cmd/helm
fi

left="$(missing)"
[[ -z "$left" ]] || die "still missing after build: $left"
log "all tools ready in $BIN ($((SECONDS - TOTAL_START))s)"
echo "$BIN"
