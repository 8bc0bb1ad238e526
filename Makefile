# Two commands for a fresh machine: `make run` (the pipeline on the builtin corpus, CPU, smoke
# preset) and `make test`. Each creates .venv and installs what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# PRESET renders params.yaml from presets/$(PRESET).yaml first; without it params.yaml is run as it
# is (the committed one is the smoke preset). SET: space-separated section.key=value overrides.
PRESET ?=
SET    ?=
VIA    ?= dvc
STAMP  := $(VENV)/.installed-stamp
# The local Prefect server the deployment targets use (make prefect-server / deploy / worker).
PREFECT_PORT ?= 4200
PREFECT_API  := http://127.0.0.1:$(PREFECT_PORT)/api
OVERRIDES := $(foreach s,$(SET),--set $(s))
# bin/stage (dvc.yaml's commands) runs stages with this interpreter, so VENV=elsewhere works too.
export PGOLF_PYTHON := $(abspath $(PY))
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# An in-process run's temporary Prefect server migrates its database first: slow on a busy machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: run test test-e2e install params repro prefect-server deploy worker clean help

help:
	@echo "make run [PRESET=smoke] [SET='k=v ...'] [VIA=dvc|prefect]   run the pipeline (changed stages only)"
	@echo "make test                                   CPU test suite, in-process (a few minutes)"
	@echo "make test-e2e                               end-to-end tests: DVC/Prefect runs, exported scripts, subprocesses"
	@echo "make install                                create .venv with pgolf and its tools"
	@echo "make params PRESET=baseline [SET='k=v ...'] render params.yaml from a preset"
	@echo "make prefect-server / deploy / worker       serve the flow on a local Prefect server"

$(STAMP): pyproject.toml
	@python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "pgolf needs Python >= 3.11 (python3 is %d.%d)" % sys.version_info[:2])'
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pgolf run $(if $(PRESET),--preset $(PRESET)) $(OVERRIDES) --via $(VIA)

test: $(STAMP)
	$(PY) -m pytest -q -m 'not e2e'

test-e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e

params: $(STAMP)
	$(PY) -m tasks.params $(if $(PRESET),--preset $(PRESET)) $(OVERRIDES)

prefect-server: $(STAMP)
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API) $(PY) -m flows.deploy

# --limit 1: a worker stands for one GPU node, which runs one job at a time; start one per node.
worker: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect worker start --pool pgolf-process --limit 1

clean:
	rm -rf artifacts/* data/corpus dvc.lock .dvc/cache .dvc/tmp
	git checkout -- artifacts/.gitignore data/.gitignore
