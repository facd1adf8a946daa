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

# MathJax 3, served by the book itself (no CDN): npm package into .cache/mathjax, its browser files copied into
# book/_static/mathjax (both gitignored). The stamp names the version, so changing MATHJAX_VERSION re-installs.
MATHJAX_VERSION := 3.2.2
MATHJAX_DIR := book/_static/mathjax
MATHJAX_STAMP := $(MATHJAX_DIR)/.installed-$(MATHJAX_VERSION)
MATHJAX_FILES := tex-chtml.js input output ui a11y sre adaptors

.PHONY: venv browser-deps mathjax test test-fast book format duplicates bench clean help

help:
	@echo "make book    build the Jupyter Book into _build/html (executes every notebook; warnings fail)"
	@echo "make test    run the whole test suite (unit, property, notebooks, book build, browser check)"
	@echo "make bench   run the speed/scale benchmarks (prints ratios against in-run baselines)"
	@echo "make format  format the notebooks' code with ruff (88 columns; make test checks it)"
	@echo "make duplicates  list code repeated across notebooks, kplib/ and benchmarks/ (make test fails on any)"
	@echo "make clean   remove build outputs and the execution cache (keeps .venv and the embedding cache)"

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the pinned CPU wheel (any other spec pulls a multi-GB CUDA build here).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

mathjax: $(MATHJAX_STAMP)

$(MATHJAX_STAMP):
	@command -v npm >/dev/null || { echo "npm not found: apt-get install -y nodejs npm"; exit 1; }
	npm install --prefix .cache/mathjax --no-save --no-audit --no-fund --no-package-lock --loglevel=error \
	  mathjax@$(MATHJAX_VERSION)
	rm -rf $(MATHJAX_DIR) && mkdir -p $(MATHJAX_DIR)
	cd .cache/mathjax/node_modules/mathjax && cp -r LICENSE $(addprefix es5/,$(MATHJAX_FILES)) $(CURDIR)/$(MATHJAX_DIR)/
	touch $@

# Headless Chromium + ChromeDriver for the browser check of the built book (Debian packages; we run as root).
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
	  echo "installing chromium + chromium-driver (Debian)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; fi

# Two xdist workers on two cores, one BLAS/OpenMP thread each (more threads oversubscribe the cores and make
# the many small matrix products of proxy learning much slower).
test: $(STAMP) browser-deps $(MATHJAX_STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -q -ra --durations=15

test-fast: $(STAMP) $(MATHJAX_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -q -m "not slow"

# Re-uses what it can: Sphinx's environment (_build/.doctrees) and the executed notebooks (jupyter-cache in
# _build/.jupyter_cache) re-run only a notebook whose code changed. The cache cannot see kplib or the KPL_*
# environment, so their digest (every file under kplib/, requirements.txt, the KPL_* variables but the cache
# folder) is kept in _build/.book-inputs; when it differs, _build is removed and every notebook re-executes.
# A failed build drops Sphinx's environment, so that the next one reports the same warnings again (an incremental
# build re-reads only changed pages). `make test` builds a copy from clean instead (tests/test_book.py).
BOOK_INPUTS := _build/.book-inputs

book: $(STAMP) $(MATHJAX_STAMP)
	@digest=$$( { find kplib -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z \
	    | xargs -0 sha256sum; sha256sum requirements.txt; env | grep '^KPL_' | grep -v '^KPL_CACHE_DIR=' | sort; } \
	    | sha256sum | cut -d' ' -f1 ); \
	if [ "$$(cat $(BOOK_INPUTS) 2>/dev/null)" != "$$digest" ]; then \
	  if [ -d _build/html ]; then echo "kplib, requirements.txt or KPL_* changed: building from clean"; fi; \
	  rm -rf _build && mkdir -p _build && echo "$$digest" > $(BOOK_INPUTS); fi
	$(VENV)/bin/jupyter-book build . -W -n --keep-going || { rm -rf _build/.doctrees; exit 1; }

format: $(STAMP)
	$(VENV)/bin/ruff format notebooks/

# Code repeated across the notebooks (as scripts in _build/scripts/notebooks), kplib/ and benchmarks/.
duplicates: $(STAMP)
	$(PY) tools/repeated_code.py --scripts _build/scripts/notebooks

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf _build .pytest_cache .hypothesis artifacts
