#!/usr/bin/env bash
# The whole test suite: what CI runs and what a developer runs before pushing.
#   scripts/test.sh            everything
#   SKIP_LINT=1 scripts/test.sh   skip fmt/clippy
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

step "test dependencies (npm servers, conformance suite, Python SDK)"
scripts/setup-test-deps.sh

if [[ "${SKIP_LINT:-0}" != 1 ]]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy"
  cargo clippy --all-targets -- -D warnings
fi

step "cargo build"
cargo build --bins

# Every relay started from here on also logs (JSON lines) into this directory; the last
# step checks that no configured secret ever reached a log.
export MCP_RELAY_LOG_DIR="$ROOT/target/test-logs"
rm -rf "$MCP_RELAY_LOG_DIR"
mkdir -p "$MCP_RELAY_LOG_DIR"

step "cargo test (unit + integration with the real binary)"
cargo test --all-targets

if [[ -f tests/py/test_relay.py ]]; then
  step "Python SDK tests"
  .venv/bin/python -m pytest tests/py -q
fi

if [[ -x scripts/conformance-diff.sh ]]; then
  step "conformance suite 0.1.16, direct vs through the relay"
  scripts/conformance-diff.sh
  # The 2026 suite: the stateless era (server/discover, _meta, headers, subscriptions/listen,
  # cache hints) beside the handshake scenarios, same rule: nothing that passes directly may
  # fail through the relay.
  step "conformance suite 0.2.0-alpha.12 (2026-07-28), direct vs through the relay"
  CONFORMANCE_PACKAGE=conformance-2026 scripts/conformance-diff.sh
fi

if [[ -x scripts/conformance-client.sh ]]; then
  step "conformance client scenarios with the relay as the client"
  scripts/conformance-client.sh
  # The 2026 suite's client scenarios for the stateless era toward servers: _meta and the
  # era's headers on every request, x-mcp-header mirroring and invalid annotations, and the
  # input_required bridge for a handshake-era client (the relay answers as an MRTR client).
  step "conformance client scenarios 0.2.0-alpha.12 (2026-07-28) with the relay as the client"
  CONFORMANCE_PACKAGE=conformance-2026 CLIENT_SCENARIOS="tools_call request-metadata http-standard-headers http-custom-headers http-invalid-tool-headers sep-2322-client-request-state" \
    scripts/conformance-client.sh
fi
step "no secret in any relay log of the run"
scripts/check-log-secrets.sh "$MCP_RELAY_LOG_DIR"

echo
echo "all test stages passed"
