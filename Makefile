# instructflow: `make demo` runs the pipeline on embedded defaults, `make test` passes the suite.
# Both create the virtual environment on first use (.venv in the checkout; rebuilt when pyproject.toml changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-labelstudio install-browser test demo bench deploy up down status screenshots clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "instructflow needs Python 3.11 (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in pyproject.toml (torch==2.13.0): never let the resolver pick a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Label Studio's server needs its own venv (.venv-labelstudio): it cannot share the pipeline's dependencies.
install-labelstudio:
	PYTHON=$(PYTHON) infra/labelstudio/install.sh

# Debian's Chromium for the labeling-UI browser test (Playwright drives it; never `playwright install`).
install-browser:
	infra/browser/install.sh

test: $(STAMP) install-labelstudio install-browser
	$(BIN)/python -m pytest -q

demo: $(STAMP) install-labelstudio
	$(BIN)/python -m flows.demo $(DEMO_ARGS)

# Peer libraries (TRL) are benchmark extras: installed here, never by `make install`/`make test`.
bench: $(STAMP)
	bench/install_peers.sh $(BIN)/python
	$(BIN)/python -m bench.model
	$(BIN)/python -m bench.pretrain
	$(BIN)/python -m bench.rlhf

# Register prefect.yaml's deployments on the Prefect server at PREFECT_API_URL (work pool INSTRUCTFLOW_WORK_POOL,
# default instructflow; the feedback round's cron stays off unless INSTRUCTFLOW_FEEDBACK_SCHEDULE=true).
deploy: $(STAMP)
	@test -n "$$PREFECT_API_URL" || { echo "set PREFECT_API_URL to a running Prefect server (e.g. http://127.0.0.1:4200/api)"; exit 2; }
	INSTRUCTFLOW_WORK_POOL=$${INSTRUCTFLOW_WORK_POOL:-instructflow} \
	INSTRUCTFLOW_FEEDBACK_SCHEDULE=$${INSTRUCTFLOW_FEEDBACK_SCHEDULE:-false} \
	$(BIN)/prefect --no-prompt deploy --all

# Local servers on 127.0.0.1 (infra/services.py): MLflow, Prefect server + worker, Label Studio; RAY=1 adds a Ray head.
# Ports: MLFLOW_PORT, PREFECT_PORT, LABEL_STUDIO_PORT, RAY_PORT, RAY_DASHBOARD_PORT; state in INSTRUCTFLOW_STATE_DIR.
SERVICES_RAY = $(if $(filter 1 true yes,$(RAY)),--ray)

up: $(STAMP) install-labelstudio
	$(BIN)/python -m infra.services up $(SERVICES_RAY)

down: $(STAMP)
	$(BIN)/python -m infra.services down

# exit status 3 (some servers stopped) is a report, not a failure of make; `python -m infra.services status` keeps it
status: $(STAMP)
	@$(BIN)/python -m infra.services status $(SERVICES_RAY) || [ $$? -eq 3 ]

# Refresh the README's screenshots of the Prefect, Label Studio and MLflow UIs (taken by a real feedback round).
screenshots: $(STAMP) install-labelstudio install-browser
	INSTRUCTFLOW_SCREENSHOT_DIR=$(CURDIR)/docs/screenshots $(BIN)/python -m pytest -q tests/test_team_servers.py -k feedback_round

clean:
	rm -rf $(VENV) .venv-labelstudio .instructflow-test
