# Shared by hack/cluster.sh and hack/realnode.sh (sourced): daemons run detached with a log and a pid file under a
# state dir, and free loopback ports.

daemon_pid() { # daemon_pid DIR NAME : prints the pid of NAME if it is alive and is ours
  local f="$1/run/$2.pid" pid
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # guard against a recycled pid: our daemons all name their state dir on their command line
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$1/" || return 1
  echo "$pid"
}

daemon_start() { # daemon_start DIR NAME CMD... : run detached (own session); DIR/logs/NAME.log, DIR/run/NAME.pid
  local dir="$1" name="$2"; shift 2
  (
    # Close every inherited descriptor above 2 (a lock, a CI runner's pipes, ...), so
    # the daemon holds nothing of its caller's open.
    for fd in /proc/$BASHPID/fd/*; do
      fd="${fd##*/}"
      if ((fd > 2)); then eval "exec ${fd}>&-" 2>/dev/null || true; fi
    done
    exec setsid "$@" >"$dir/logs/$name.log" 2>&1 </dev/null
  ) &
  echo $! >"$dir/run/$name.pid"
  # The exact command line, so `hack/cluster.sh start NAME` can run it again after a stop (chaos tests).
  printf '%q ' "$@" >"$dir/run/$name.cmd"
}

free_ports() { # free_ports N : N distinct free TCP ports on 127.0.0.1
  if command -v python3 >/dev/null; then
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
  else
    local ports=() p
    while ((${#ports[@]} < $1)); do
      p=$((20000 + RANDOM % 30000))
      [[ " ${ports[*]} " == *" $p "* ]] && continue
      ss -Htln "sport = :$p" 2>/dev/null | grep -q . && continue
      ports+=("$p")
    done
    echo "${ports[*]}"
  fi
}
