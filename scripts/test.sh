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

step "cargo test (unit + integration with the real binary)"
cargo test --all-targets

if [[ -f tests/py/test_relay.py ]]; then
  step "Python SDK tests"
  .venv/bin/python -m pytest tests/py -q
fi

if [[ -x scripts/conformance-diff.sh ]]; then
  step "conformance suite, direct vs through the relay"
  scripts/conformance-diff.sh
fi

if [[ -x scripts/conformance-client.sh ]]; then
  step "conformance client scenarios with the relay as the client"
  scripts/conformance-client.sh
fi
echo
echo "all test stages passed"
