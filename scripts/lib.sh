# Shared shell helpers of the test scripts; source it (`. "$ROOT/scripts/lib.sh"`).

descendants() { # PID: every live descendant of PID (recursively), one per line
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    echo "$c"
    descendants "$c"
  done
}

stop_tree() { # PID: TERM it and its descendants (some start their own process groups),
  # wait up to 5 s, then KILL whatever is left; all by pid.
  local pid="$1" i p alive tree
  tree=("$pid" $(descendants "$pid"))
  for p in "${tree[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for ((i = 0; i < 50; i++)); do
    alive=0
    for p in "${tree[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for p in "${tree[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait "$pid" 2>/dev/null || true
}
