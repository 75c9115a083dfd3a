# `make test` and `make demo` each create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
# The local CPU build; an unpinned torch pulls several GB of CUDA wheels. Override: make test TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nanoseek-installed

.PHONY: test demo install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q $(if $(TORCH_SPEC),"$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(VENV)/bin/nanoseek demo

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs/demo
