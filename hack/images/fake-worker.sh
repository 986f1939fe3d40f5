#!/bin/sh
# A stand-in NVFlare worker for the real-node tests (the busybox image's /bin/fake-worker): a real process in a
# real container, started with the exact command line the operator gives an NVFlare worker. It ignores NVFlare's
# flags and acts on its `--set` options:
#   exit_code=N        exit with N once the run is over (default 0)
#   run_seconds=S      run this long first (default 1; "forever" = until aborted or killed)
#   memory_mb=M        allocate and touch M MiB at the start (for OOMKilled under a memory limit)
#   on_term=exit|ignore  on SIGTERM: exit 143 (default) or ignore it (then only SIGKILL ends it)
#   on_abort=exit|ignore on the operator's abort annotation (fljob.dev/abort in the downward-API file): exit 0, as
#                        NVFlare's worker does after an ABORT (default), or ignore it
# It prints its user id and what it sees, so `kubectl logs` shows it.
exit_code=0 run_seconds=1 memory_mb=0 on_term=exit on_abort=exit
for a in "$@"; do
  case "$a" in
    exit_code=*) exit_code=${a#*=} ;;
    run_seconds=*) run_seconds=${a#*=} ;;
    memory_mb=*) memory_mb=${a#*=} ;;
    on_term=*) on_term=${a#*=} ;;
    on_abort=*) on_abort=${a#*=} ;;
  esac
done
info=${FLJOB_INFO_DIR:-/etc/fljob}/annotations
echo "fake-worker: uid=$(id -u) gid=$(id -g) pid=$$ args: $*"
if [ "$on_term" = ignore ]; then trap '' TERM; else trap 'echo "fake-worker: SIGTERM"; exit 143' TERM; fi
if [ "$memory_mb" -gt 0 ]; then
  # After a moment, as a real worker would (containerd watches for OOM only once the container has started).
  sleep 1
  echo "fake-worker: allocating ${memory_mb} MiB"
  # The worker process itself grows (exec): under a smaller limit the kernel OOM-kills the container's main process.
  exec dd if=/dev/zero of=/dev/null bs="${memory_mb}M" count=1
fi
ticks=0
while :; do
  if [ "$on_abort" = exit ] && grep -q '^fljob.dev/abort=' "$info" 2>/dev/null; then
    echo "fake-worker: abort seen in $info; stopping cleanly"
    exit 0
  fi
  if [ "$run_seconds" != forever ] && [ "$ticks" -ge $((run_seconds * 5)) ]; then
    echo "fake-worker: done, exit $exit_code"
    exit "$exit_code"
  fi
  sleep 0.2 &
  wait $!
  ticks=$((ticks + 1))
done
