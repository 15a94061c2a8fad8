# lowbit — the two commands a newcomer needs:
#   make run    install everything into .venv, then run the whole pipeline on the offline defaults
#   make test   install everything into .venv, then run the default (fast) test suite
# GPU machines: `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128` (see README).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Empty = take torch 2.13.0 from the default index (CPU wheel on the project's machines).
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: install run test test-slow bench clean-outputs

install: $(VENV)/.installed

# Re-installs only when the lock or the package metadata changed (idempotent).
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_FLAGS) -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/lowbit run

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow" -q

test-slow: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m slow -q

bench: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/quant.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/peft.py

# Removes pipeline outputs from the work tree (the DVC cache keeps every version).
clean-outputs:
	rm -rf data/prepared models metrics reports
