# Two commands: `make demo` (train on the embedded dataset) and `make test` (default test suite).
# Both create/reuse .venv and install what they need into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
# torch is pinned to the release these machines (and most clouds' images) carry; pip takes it from
# a local wheel cache when there is one.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.stamp-install

.PHONY: demo test test-slow test-all install clean help browser

help:
	@echo "make demo      train on the embedded toy dataset (pretrained vs scratch) and print metrics"
	@echo "make test      run the default test suite (CPU, < 20 min)"
	@echo "make test-slow run the slow integration tests"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/make_toy_dataset.py
	bash scripts/demo.sh

# Chromium for the report.html browser test (tests/test_report_html.py): Debian's package when it is
# missing and apt can install it (root); otherwise the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      (apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1) || echo "could not install chromium"; \
	    else echo "no chromium (needs root and apt-get): the browser test is skipped"; fi; }

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

clean:
	rm -rf runs .pytest_cache
