#!/usr/bin/env bash
# Fails if a log written by any relay during the test run (MCP_RELAY_LOG_DIR, set by
# scripts/test.sh) holds a secret the tests configured: bearer tokens of auth clients,
# env values of servers, header values, URL passwords and query tokens, API keys.
#   scripts/check-log-secrets.sh DIR
set -euo pipefail
DIR="${1:?usage: check-log-secrets.sh LOG_DIR}"
# Every token of tests/it/security.rs contains s3cr3t; the rest are the values other tests
# put in configs (tests/it/admin.rs, selection.rs, ws.rs).
SECRETS=(s3cr3t s3cret hunter2-value envsecret pwsecret querysecret headersecret argsecret sk-test-secret)
mapfile -t files < <(find "$DIR" -type f -name 'mcp-relay*' 2>/dev/null)
if [[ ${#files[@]} -eq 0 ]]; then
  echo "check-log-secrets: no relay logs under $DIR; was MCP_RELAY_LOG_DIR passed down?" >&2
  exit 1
fi
lines=$(cat "${files[@]}" | wc -l)
bad=0
for s in "${SECRETS[@]}"; do
  if grep -F -n -- "$s" "${files[@]}" | head -5; then
    echo "check-log-secrets: the secret '$s' appears in the relay logs above" >&2
    bad=1
  fi
done
[[ $bad -eq 0 ]] || exit 1
echo "check-log-secrets: ${#files[@]} log file(s), $lines lines, none holds any of ${#SECRETS[@]} test secrets"
