#!/usr/bin/env bash
# Starts, stops and reports on the local Label Studio server: labelstudio.sh start|stop|status (see control.py).
# `start` first builds Label Studio's own venv when it is missing or stale (install.sh).
#
#   INSTRUCTFLOW_STATE_DIR  state directory (default <checkout>/.instructflow); the server uses its labelstudio/
#   INSTRUCTFLOW_LS_VENV    Label Studio's venv (default <checkout>/.venv-labelstudio)
#   LABEL_STUDIO_PORT       port on 127.0.0.1 (default 8080); a busy port is an error, never silently replaced
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "${1:-}" == start ]]; then
    "$here/install.sh"
fi
exec "${PYTHON:-python3}" "$here/control.py" "$@"
