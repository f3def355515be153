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

template="$venv/instructflow-migrated.sqlite3"  # an empty, migrated database: no users, no secrets

venv_ready() {
    [[ -x "$venv/bin/label-studio" && -f "$stamp" ]] &&
        [[ "$(cat "$stamp")" == "$(sha256sum "$requirements" | cut -d' ' -f1)" ]]
}
up_to_date() { venv_ready && [[ -f "$template" ]]; }

# Label Studio migrates a new data dir on its first start (1-2 minutes on 2 cores). Doing it once here, into a
# database every new state dir starts from, moves that wait out of the first `make demo`. Only the database is kept:
# the secret key Label Studio writes beside it (.env) stays in the scratch dir and is deleted.
migrate_template() {
    local scratch
    scratch="$(mktemp -d)"
    env -i PATH="$venv/bin:/usr/bin:/bin" HOME="$scratch" LANG=C.UTF-8 LABEL_STUDIO_BASE_DATA_DIR="$scratch/data" \
        LATEST_VERSION_CHECK=false SENTRY_DSN= COLLECT_ANALYTICS=false DEBUG=false \
        "$venv/bin/python" -c 'from label_studio.server import _setup_env, _apply_database_migrations
_setup_env(); _apply_database_migrations()' >"$scratch/migrate.log" 2>&1 ||
        { cat "$scratch/migrate.log" >&2; rm -rf "$scratch"; echo "labelstudio: migrating the template database failed" >&2; exit 1; }
    install -m 600 "$scratch/data/label_studio.sqlite3" "$template.tmp" && mv "$template.tmp" "$template"
    rm -rf "$scratch"
}

up_to_date && exit 0
exec 9<"$requirements" && flock 9   # one build at a time (a second caller waits, then finds it done)
up_to_date && exit 0

if ! venv_ready; then
    if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
        echo "labelstudio: $venv exists and is not a virtual environment; move it or set INSTRUCTFLOW_LS_VENV" >&2
        exit 1
    fi
    echo "labelstudio: building the Label Studio venv in $venv (2-3 minutes)"
    started=$SECONDS
    "${PYTHON:-python3}" -m venv --clear "$venv"   # a changed requirements file rebuilds from scratch
    "$venv/bin/python" -m pip install --quiet --quiet --disable-pip-version-check -r "$requirements"
    rm -f "$template"
    sha256sum "$requirements" | cut -d' ' -f1 >"$stamp"
    echo "labelstudio: venv ready in $((SECONDS - started)) s"
fi
echo "labelstudio: migrating an empty database for new state dirs (about a minute)"
migrate_template
