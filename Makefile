# The README's two commands: `make run` (main job on the embedded default) and `make test` (whole suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@# A machine that already has torch (the GPU box) keeps it: the venv then sees system site-packages.
	@test -x $(BIN)/python || { $(PY) -c "import torch" 2>/dev/null && $(PY) -m venv --system-site-packages $(VENV) \
		|| $(PY) -m venv $(VENV); }
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0 numpy
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

run: venv
	$(BIN)/miles demo

test: venv
	$(BIN)/ruff check miles tests bench examples
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check miles tests bench examples
