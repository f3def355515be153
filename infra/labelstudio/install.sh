#!/usr/bin/env bash
# Builds Label Studio's own virtual environment (it cannot share the pipeline's: prefect and label-studio pin
# conflicting packages). Idempotent: skipped while the venv's stamp matches requirements.txt, rebuilt when it changes.
#
#   INSTRUCTFLOW_LS_VENV  where the venv goes (default: <checkout>/.venv-labelstudio)
#   PYTHON                the interpreter to build it from (default: python3; Label Studio 1.23 needs >= 3.10)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
checkout="$(cd "$here/../.." && pwd)"
venv="${INSTRUCTFLOW_LS_VENV:-$checkout/.venv-labelstudio}"
requirements="$here/requirements.txt"
stamp="$venv/.installed"

up_to_date() {
    [[ -x "$venv/bin/label-studio" && -f "$stamp" ]] &&
        [[ "$(cat "$stamp")" == "$(sha256sum "$requirements" | cut -d' ' -f1)" ]]
}

up_to_date && exit 0
exec 9<"$requirements" && flock 9   # one build at a time (a second caller waits, then finds it done)
up_to_date && exit 0

if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
    echo "labelstudio: $venv exists and is not a virtual environment; move it or set INSTRUCTFLOW_LS_VENV" >&2
    exit 1
fi
echo "labelstudio: building the Label Studio venv in $venv (2-3 minutes)"
started=$SECONDS
"${PYTHON:-python3}" -m venv --clear "$venv"   # a changed requirements file rebuilds from scratch
"$venv/bin/python" -m pip install --quiet --quiet --disable-pip-version-check -r "$requirements"
sha256sum "$requirements" | cut -d' ' -f1 >"$stamp"
echo "labelstudio: venv ready in $((SECONDS - started)) s"
