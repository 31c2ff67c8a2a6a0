# The README's two commands are `make demo` and `make test`; CI (.ci/run) runs `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, pinned, so pip never resolves the open range to a multi-GB CUDA build;
# a venv that already has a torch (e.g. a GPU build via --system-site-packages) keeps it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/gradspectra demo

test: install
	$(BIN)/python -m ruff check src tests examples benchmarks
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

lint: install
	$(BIN)/python -m ruff check src tests examples benchmarks

typecheck: install
	$(BIN)/python -m mypy

bench: install
	$(BIN)/python benchmarks/spectra.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
