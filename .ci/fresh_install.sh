#!/usr/bin/env bash
# CI stage: what a user gets from a fresh `make serve`. A new virtual environment with requirements.txt alone
# (the Makefile's own `setup`, torch CPU step included), the server started by `make serve` on the demo
# checkpoint, then .ci/fresh_checks.py over real HTTP: every router available, a job, MCP, /ui, /health ok.
# The dev requirements are never installed here, so a package that only they bring shows up as a failure.
# Exits non-zero on any failure, with the server's log.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-runtime
rm -rf "$VENV"
# pip's cache (on by default) serves the second install of the same wheels (.ci/run's .venv) from disk.
make --no-print-directory setup VENV="$VENV"

port=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
scratch=$(mktemp -d)
log="$scratch/serve.log"
# Its own session (process group), so that stopping it stops make, uvicorn and the engine workers together.
env -u MODEL_PATH DATA_DIR="$scratch/data" \
  setsid make --no-print-directory serve VENV="$VENV" HOST=127.0.0.1 PORT="$port" >"$log" 2>&1 &
server=$!

stop() {
  kill -TERM -- "-$server" 2>/dev/null || true
  for _ in $(seq 60); do
    kill -0 -- "-$server" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$server" 2>/dev/null || true
  rm -rf "$scratch"
}
trap stop EXIT

echo "fresh install: $VENV (requirements.txt only), make serve on 127.0.0.1:$port"
if ! "$VENV/bin/python" .ci/fresh_checks.py "http://127.0.0.1:$port" "$server"; then
  echo "--- the server's log (last 60 lines) ---"
  tail -n 60 "$log"
  exit 1
fi
