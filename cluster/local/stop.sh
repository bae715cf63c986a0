#!/usr/bin/env bash
# Stop the worker nodes and the head of the local cluster in DIR (only that cluster).
#   cluster/local/stop.sh [--dir DIR]
set -euo pipefail
PYTHON="${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m engine.local_head stop "$@"
