#!/usr/bin/env bash
# Print the client environment of the local cluster in DIR:  eval "$(cluster/local/env.sh)"
set -euo pipefail
PYTHON="${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m engine.local_head env "$@"
