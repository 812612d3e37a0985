# Two commands do all the set-up:  `make train`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
TORCH_SPEC ?= torch==2.13.0
# the corpus beside the checkout, where there is one (offline machines, CI); else downloaded
SHARED_CORPUS := $(abspath ../shared/data/tinyshakespeare/input.txt)
ifeq ($(origin GPTLAB_DATA), undefined)
ifneq ($(wildcard $(SHARED_CORPUS)),)
export GPTLAB_DATA := $(SHARED_CORPUS)
endif
endif
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install browser postgres train test lint ui server bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# the browser the UI test drives (Debian's chromium); without root it is left to the user and
# that test skips
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		>/dev/null; } || echo "note: install chromium to run the browser test"

# PostgreSQL for the team-server tests, which start a server of their own from Debian's
# binaries (/usr/lib/postgresql/N/bin); without root it is left to the user and those tests skip
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
		>/dev/null; } || echo "note: install postgresql to run the team-server tests"

## train the default model (nanoGPT's CPU recipe), print a sample and the MLflow run id
train: install
	$(BIN)/gptlab-train $(ARGS)

## the test suite
test: install browser postgres
	$(BIN)/ruff check src tests experiments
	$(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check src tests experiments

## the MLflow UI over mlruns/, on http://127.0.0.1:5000
ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000

## the team's MLflow server: runs in PostgreSQL, artifacts uploaded through it; clients use
## logger.tracking_uri=http://HOST:PORT. make server DB=postgresql://user:pw@dbhost:5432/mlflow
## HOST=0.0.0.0 PORT=5000 ARTIFACTS=/srv/gptlab-artifacts (DB may come from
## $$MLFLOW_BACKEND_STORE_URI instead, which keeps the password off the command line)
HOST      ?= 127.0.0.1
PORT      ?= 5000
ARTIFACTS ?= $(CURDIR)/mlartifacts
server: install
	$(BIN)/gptlab-server $(DB) --host $(HOST) --port $(PORT) --artifacts $(ARTIFACTS) $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
