#!/usr/bin/env bash
# Start a local Ray head on 127.0.0.1 with token auth (token file 0600 in the cluster dir).
#   cluster/local/start-head.sh [--dir DIR] [--num-cpus N] [--resources JSON]
# Then: eval "$(cluster/local/env.sh)" to point clients (ray.init, grainflow submit) at it.
set -euo pipefail
PYTHON="${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m engine.local_head start "$@"
