# Set-up and checks. `make test` works on a fresh machine with only the package registries.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
# Both cores: the statistical tests are CPU-bound and independent.
PYTEST_ARGS ?= -n auto

.PHONY: test demo bench-resampling clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,hf,bench,http]"
	touch $@

# The HTML report is tested in headless Chromium (Debian's package).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest $(PYTEST_ARGS)

# The embedded demo: 7 methods x budgets 1-16 on 100 held-out problems (table, plots, report).
demo: $(STAMP)
	$(VENV)/bin/itscale demo

bench-resampling: $(STAMP)
	$(PY) benchmarks/resampling.py

clean:
	rm -rf $(VENV) .pytest_cache build dist
