# Set-up and checks. `make test` works on a fresh machine with only the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
# Both cores: the statistical tests are CPU-bound and independent.
PYTEST_ARGS ?= -n auto

.PHONY: test bench-resampling clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,hf,bench]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench-resampling: $(STAMP)
	$(PY) benchmarks/resampling.py

clean:
	rm -rf $(VENV) .pytest_cache build dist
