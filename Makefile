# kpl-book: `make book` builds the book, `make test` runs every test. Each sets up .venv when needed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Tests and notebooks never open a display; headless figures are still embedded by the inline backend.
export PYTHONHASHSEED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv browser-deps test test-fast book bench clean help

help:
	@echo "make book    build the Jupyter Book into _build/html (executes every notebook; warnings fail)"
	@echo "make test    run the whole test suite (unit, property, notebooks, book build, browser check)"
	@echo "make bench   run the speed/scale benchmarks (prints ratios against in-run baselines)"
	@echo "make clean   remove build outputs (keeps .venv and the embedding cache)"

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the pinned CPU wheel (any other spec pulls a multi-GB CUDA build here).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

# Headless Chromium + ChromeDriver for the browser check of the built book (Debian packages; we run as root).
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
	  echo "installing chromium + chromium-driver (Debian)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; fi

# Two xdist workers on two cores, one BLAS/OpenMP thread each (more threads oversubscribe the cores and make
# the many small matrix products of proxy learning much slower).
test: $(STAMP) browser-deps
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -q -ra --durations=15

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -q -m "not slow"

book: $(STAMP)
	rm -rf _build
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf _build .pytest_cache .hypothesis artifacts
