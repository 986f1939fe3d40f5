#!/usr/bin/env bash
# Container images for the real test node, built here without Docker or a registry and cached by content:
#
#   hack/images.sh build NAME...   build (or reuse) images; prints "NAME REF TARFILE" per image
#   hack/images.sh import SOCKET NAME...   build if needed, then import into containerd (namespace k8s.io)
#   hack/images.sh ref NAME        print the image reference NAME is tagged with (builds if needed)
#
# Images (all linux/amd64):
#   pause     the node's sandbox image: a static program that waits for signals (hack/images/pause.c)
#   busybox   a small test image: Debian's static busybox, /bin/sh and the usual applets, user 1000, and
#             /bin/fake-worker (hack/images/fake-worker.sh), a stand-in worker driven by its --set options
#   worker    the NVFlare worker image: a minimal Debian bookworm rootfs (debootstrap), Python 3.11 as
#             /usr/local/bin/python with nvflare==$NVFLARE_VERSION and kubernetes, plus this repo's
#             fljob-launcher package (its worker entry point); the shape of NVFlare's own image
#   operator  the operator: the static release binary on a distroless-style rootfs (CA certificates, the
#             nonroot user 65532, /tmp), with USER, ENTRYPOINT, CMD, EXPOSE and LABELs read from the
#             Dockerfile's final stage (hack/images/oci-pack.py --dockerfile)
#
# Cache: ${FLJOB_IMAGES_CACHE:-<tools cache root>/images}/NAME-<digest>.tar. The digest covers every input of an
# image (recipe, sources, package versions, binary), so a change rebuilds just that image.
set -euo pipefail
shopt -s inherit_errexit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/hack/images"
CACHE_ROOT="${FLJOB_TOOLS_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/fljob-operator}"
CACHE="${FLJOB_IMAGES_CACHE:-$CACHE_ROOT/images}"
NVFLARE_VERSION="${FLJOB_NVFLARE_VERSION:-2.9.0}"
# The worker builds every component of the site's resources.json it downloads, the job launcher included, so
# the launcher's own dependency is in the image too (the version the launcher is tested with).
KUBERNETES_VERSION="${FLJOB_KUBERNETES_VERSION:-37.0.2}"
SUITE=bookworm
RECIPE=1
log() { printf '[images] %s\n' "$*" >&2; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }

digest() { sha256sum | cut -c1-12; }
# An image's key covers its own build function (not the whole script), the packer and its inputs.
recipe_of() { declare -f "$@"; cat "$HERE/oci-pack.py"; echo "recipe=$RECIPE"; }

need_pkgs() { # need_pkgs CMD:PACKAGE ... : apt-get install what is missing
  local want=() p
  for p in "$@"; do command -v "${p%%:*}" >/dev/null 2>&1 || [[ -e "${p%%:*}" ]] || want+=("${p##*:}"); done
  ((${#want[@]})) || return 0
  log "installing ${want[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
}

pack() { # pack NAME TAG OUT [oci-pack args...] ROOTFS...
  local out="$3"
  python3 "$HERE/oci-pack.py" --out "$out" --tag "$2" "${@:4}" >/dev/null
}

# --- the images -------------------------------------------------------------------------------------------------

key_pause() { { recipe_of build_pause pack; cat "$HERE/pause.c"; } | digest; }
build_pause() { # build_pause OUT TAG
  need_pkgs gcc:gcc /usr/lib/x86_64-linux-gnu/libc.a:libc6-dev
  local r; r="$(mktemp -d)"
  mkdir -p "$r/rootfs"
  gcc -static -Os -s -o "$r/rootfs/pause" "$HERE/pause.c"
  pack pause "$2" "$1" --entrypoint '["/pause"]' --user 65535:65535 "$r/rootfs"
  rm -rf "$r"
}

key_busybox() { { recipe_of build_busybox pack; cat "$HERE/fake-worker.sh"; dpkg-query -W busybox-static 2>/dev/null || echo none; } | digest; }
build_busybox() {
  need_pkgs /bin/busybox:busybox-static
  local r; r="$(mktemp -d)"
  local fs="$r/rootfs"
  mkdir -p "$fs"/{bin,etc,tmp,home/user}
  cp /bin/busybox "$fs/bin/busybox"
  local a
  for a in sh ash cat dd echo env false head kill ls mkdir printf ps rm sleep sync tail test timeout touch trap tr true wc yes id grep sed; do
    ln -s busybox "$fs/bin/$a"
  done
  install -m 0755 "$HERE/fake-worker.sh" "$fs/bin/fake-worker"
  printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n' >"$fs/etc/passwd"
  printf 'root:x:0:\nuser:x:1000:\n' >"$fs/etc/group"
  chmod 1777 "$fs/tmp"; chown 1000:1000 "$fs/home/user"
  pack busybox "$2" "$1" --cmd '["/bin/sh"]' "$fs"
  rm -rf "$r"
}

python_pkg_files() { (cd "$ROOT/python" && git ls-files -co --exclude-standard pyproject.toml fljob_launcher | grep -v '\.pyc$' | sort | xargs cat); }
key_worker_base() { { declare -f worker_base_rootfs; echo "recipe=$RECIPE $SUITE nvflare==$NVFLARE_VERSION kubernetes==$KUBERNETES_VERSION"; } | digest; }
key_worker() { { key_worker_base; recipe_of build_worker pack; python_pkg_files; } | digest; }
worker_base_rootfs() { # builds (or reuses) the unpacked base rootfs: debootstrap + python + nvflare; prints its dir
  local key dir
  key="$(key_worker_base)"
  dir="$CACHE/worker-base-$key"
  if [[ -f "$dir/.complete" ]]; then echo "$dir"; return; fi
  need_pkgs debootstrap:debootstrap
  rm -rf "$dir" "$dir.partial"
  local fs="$dir.partial/rootfs" t0=$SECONDS
  mkdir -p "$fs"
  log "worker base: debootstrap --variant=minbase $SUITE (about a minute)"
  local mirror
  mirror="$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
  [[ -n "$mirror" ]] || mirror="$(awk '$1=="deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)"
  [[ -n "$mirror" ]] || mirror="http://deb.debian.org/debian"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$fs" "$mirror" \
    >"$dir.partial/debootstrap.log" 2>&1 || { tail -n 30 "$dir.partial/debootstrap.log" >&2; die "debootstrap failed"; }
  # The wheels are fetched by the host's pip (it trusts the machine's proxy CA); pip inside the rootfs installs
  # them offline. Host and image are both CPython 3.11 on amd64, so the host picks the right wheels.
  local wheels="$dir.partial/wheels"
  log "worker base: nvflare==$NVFLARE_VERSION wheels"
  python3 -m pip download --disable-pip-version-check -q --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$wheels" "nvflare==$NVFLARE_VERSION" "kubernetes==$KUBERNETES_VERSION" >&2
  mkdir -p "$fs/tmp/wheels"
  cp "$wheels"/* "$fs/tmp/wheels/"
  chroot "$fs" /usr/bin/python3 -m venv /usr/local
  chroot "$fs" /usr/local/bin/python -m pip install --disable-pip-version-check -q --no-index \
    --find-links /tmp/wheels "nvflare==$NVFLARE_VERSION" "kubernetes==$KUBERNETES_VERSION" >&2
  rm -rf "$fs/tmp/wheels" "$fs"/var/cache/apt/archives/*.deb "$fs"/var/lib/apt/lists/* "$fs"/root/.cache
  find "$fs/usr/local" -name '__pycache__' -prune -exec rm -rf {} +
  # NVFlare's image runs as an unprivileged user; the pod sets runAsUser 1000.
  chroot "$fs" /usr/sbin/groupadd -g 1000 nvflare
  chroot "$fs" /usr/sbin/useradd -u 1000 -g 1000 -m -s /bin/sh nvflare
  mkdir -p "$fs/var/tmp/nvflare/workspace"
  chown 1000:1000 "$fs/var/tmp/nvflare" "$fs/var/tmp/nvflare/workspace"
  touch "$dir.partial/.complete"
  mv "$dir.partial" "$dir"
  find "$CACHE" -maxdepth 1 -type d -name 'worker-base-*' ! -name "worker-base-$key" -exec rm -rf {} +
  log "worker base ready in $((SECONDS - t0))s"
  echo "$dir"
}
build_worker() {
  local base r
  base="$(worker_base_rootfs)"
  r="$(mktemp -d)"
  # Layer 2: this repo's launcher package (the worker entry point), its files only: its dependencies are in the
  # base layer.
  local site="usr/local/lib/python3.11/site-packages"
  mkdir -p "$r/rootfs/$site"
  (cd "$ROOT/python" && git ls-files -co --exclude-standard fljob_launcher | grep '\.py$' | while read -r f; do
     mkdir -p "$r/rootfs/$site/$(dirname "$f")"; cp "$f" "$r/rootfs/$site/$f"; done)
  pack worker "$2" "$1" --user 1000:1000 --workdir /var/tmp/nvflare/workspace \
    --cmd '["/usr/local/bin/python"]' "$base/rootfs" "$r/rootfs"
  rm -rf "$r"
}

operator_bin() { # builds the static release binary; prints its path
  local target=x86_64-unknown-linux-gnu
  log "operator: cargo build --release (static, $target)"
  (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked \
    --target "$target" --bin fljob-operator) >&2
  local bin="$ROOT/target/$target/release/fljob-operator"
  # Same check as the Dockerfile: no program interpreter, i.e. static.
  if readelf --program-headers "$bin" | grep -q 'program interpreter'; then die "$bin is not static"; fi
  echo "$bin"
}
OPERATOR_BIN=""
key_operator() {
  { recipe_of build_operator pack; cat "$ROOT/Dockerfile" "$OPERATOR_BIN"; } | digest
}
build_operator() {
  local r; r="$(mktemp -d)"
  local fs="$r/rootfs"
  mkdir -p "$fs"/{etc/ssl/certs,usr/local/bin,tmp,home/nonroot}
  install -m 0755 "$OPERATOR_BIN" "$fs/usr/local/bin/fljob-operator"
  # What distroless/static's nonroot variant holds that the binary can use: users, CA roots, a writable /tmp.
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$fs/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$fs/etc/group"
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] && cp /etc/ssl/certs/ca-certificates.crt "$fs/etc/ssl/certs/"
  chmod 1777 "$fs/tmp"; chown 65532:65532 "$fs/home/nonroot"
  pack operator "$2" "$1" --dockerfile "$ROOT/Dockerfile" "$fs"
  rm -rf "$r"
}

# --- driver -------------------------------------------------------------------------------------------------------

ref_of() { # ref_of NAME KEY
  case "$1" in
    operator) echo "fljob.local/fljob-operator:$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)-$2" ;;
    worker) echo "fljob.local/nvflare-worker:$NVFLARE_VERSION-$2" ;;
    *) echo "fljob.local/$1:$2" ;;
  esac
}

build_one() { # build_one NAME -> prints "NAME REF TAR"
  local name="$1" key ref tar
  case "$name" in pause|busybox|worker|operator) ;; *) die "unknown image: $name" ;; esac
  if [[ "$name" == operator ]]; then OPERATOR_BIN="$(operator_bin)"; fi
  key="$("key_$name")"
  ref="$(ref_of "$name" "$key")"
  tar="$CACHE/$name-$key.tar"
  mkdir -p "$CACHE"
  # One build of an image at a time (two test runs, a demo and a test, may ask at once).
  local lock
  exec {lock}>"$CACHE/.$name.lock"
  flock "$lock"
  if [[ ! -f "$tar" ]]; then
    local t0=$SECONDS
    log "building $name ($ref)"
    "build_$name" "$tar.tmp" "$ref"
    mv -f "$tar.tmp" "$tar"
    # Keep one tar per image: drop the ones this build replaces.
    find "$CACHE" -maxdepth 1 -name "$name-*.tar" ! -name "$name-$key.tar" -delete
    log "built $name in $((SECONDS - t0))s: $(du -h "$tar" | cut -f1)"
  fi
  exec {lock}>&-
  echo "$name $ref $tar"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  build) for n in "$@"; do build_one "$n"; done ;;
  ref) build_one "$1" | cut -d' ' -f2 ;;
  import)
    sock="$1"; shift
    ctr="${FLJOB_CTR:-ctr}"
    for n in "$@"; do
      read -r name ref tar <<<"$(build_one "$n")"
      if "$ctr" --address "$sock" -n k8s.io images ls -q 2>/dev/null | grep -qxF "$ref"; then
        echo "$name $ref $tar"; continue
      fi
      t0=$SECONDS
      "$ctr" --address "$sock" -n k8s.io images import --no-unpack=false "$tar" >/dev/null
      log "imported $name in $((SECONDS - t0))s"
      echo "$name $ref $tar"
    done ;;
  -h|--help|"") sed -n '2,22p' "${BASH_SOURCE[0]}" ;;
  *) die "unknown command: $cmd" ;;
esac
