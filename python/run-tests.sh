#!/usr/bin/env bash
# Tests of the NVFlare launcher (python/): makes its virtualenv, installs the package with its test extras
# (nvflare 2.9.x, kubernetes, pytest) and runs pytest -v over python/tests.
#
#   python/run-tests.sh [pytest args...]
#
# Environment:
#   FLJOB_VENV             virtualenv to use/create (default: python/.venv)
#   PYTHON                 interpreter that creates it (default: python3; needs >= 3.10, as nvflare 2.9 does)
#   FLJOB_TEST_KUBECONFIG  admin kubeconfig of the local cluster  } for tests/test_integration.py; without them
#   FLJOB_OPERATOR_BIN     the fljob-operator binary               } it is skipped, or fails when CI or
#                                                                    FLJOB_REQUIRE_CLUSTER is set
# Exit status: pytest's, except that "no tests collected" (5) is a failure too.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${FLJOB_VENV:-$HERE/.venv}"
PY="${PYTHON:-python3}"

log() { printf '[python-tests] %s\n' "$*" >&2; }

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  log "ERROR: $PY is missing or older than Python 3.10"
  exit 2
fi

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
  log "creating virtualenv $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

# (Re)install when the project definition changed since the last install into this virtualenv.
stamp="$VENV/.fljob-launcher-installed"
want="$(cat "$HERE/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] || ! "$VENV/bin/python" -c 'import fljob_launcher, nvflare, kubernetes, pytest' 2>/dev/null; then
  log "installing fljob-launcher[test] into $VENV"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -e "$HERE[test]"
  echo "$want" >"$stamp"
fi
"$VENV/bin/python" -c 'import nvflare, kubernetes; print("[python-tests] nvflare", nvflare.__version__, "/ kubernetes", kubernetes.__version__)' >&2

if [[ -z "${FLJOB_TEST_KUBECONFIG:-}" || -z "${FLJOB_OPERATOR_BIN:-}" ]]; then
  log "FLJOB_TEST_KUBECONFIG / FLJOB_OPERATOR_BIN not both set: the integration test will $(
    [[ -n "${CI:-}${FLJOB_REQUIRE_CLUSTER:-}" ]] && echo FAIL || echo be skipped)"
fi

cd "$HERE"
set +e
"$VENV/bin/python" -m pytest -v -p no:cacheprovider "$@" tests
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  log "ERROR: pytest collected no tests"
  exit 1
fi
exit $rc
