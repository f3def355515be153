#!/usr/bin/env bash
# Installs the peer libraries that `make bench` compares against (TRL 1.12.0 and what its imports need) into the
# pipeline's venv without moving torch or transformers. Usage: bench/install_peers.sh [path/to/venv/python]
set -euo pipefail

PY="${1:-.venv/bin/python}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if "$PY" -c 'import trl, sys; sys.exit(trl.__version__ != "1.12.0")' 2>/dev/null; then
    echo "trl 1.12.0 already installed in $PY; nothing to do"
    exit 0
fi

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==2.13.0\ntransformers==5.23.0\n' > "$CONSTRAINTS"

"$PY" -m pip install --quiet -r "$HERE/requirements-peers.txt" -c "$CONSTRAINTS"
"$PY" -m pip install --quiet --no-deps trl==1.12.0
"$PY" -c 'import torch, transformers, trl; assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__; assert transformers.__version__ == "5.23.0", transformers.__version__; print("trl", trl.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
