#!/usr/bin/env bash
# Add a worker node (on 127.0.0.1, token auth) to the local head of DIR.
#   cluster/local/add-worker.sh [--dir DIR] [--num-cpus N] [--resources '{"big-mem": 1}']
set -euo pipefail
PYTHON="${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m engine.local_head add-worker "$@"
