# Seawall: everything a fresh Debian/Ubuntu machine needs, in two commands (see README.md).
#   make run    install into .venv, then start the sidecar on config/sidecar.yaml with a built-in demo upstream
#   make test   install everything the suite needs into .venv, then run it
#
# Python packages go into a project virtual environment, .venv, created with `$(PYTHON) -m venv`: a system
# Python that is externally managed (PEP 668, Debian 12, Ubuntu 24.04) refuses `pip install`, and a pyenv or
# virtualenv interpreter works the same way. `make PYTHON=python3.12 ...` picks the interpreter the venv is made
# from (delete .venv to switch). pip in the venv reads the same pip configuration (index, certificates) as
# outside it.
PYTHON ?= python3
VENV ?= .venv
VENV_BIN := $(VENV)/bin
VENV_PYTHON := $(VENV_BIN)/python
PIP := $(VENV_PYTHON) -m pip
# Recipes that run project commands put the venv first on PATH, so tests that start `sidecar` or
# `checkpoint-cleanup` by name find the ones just installed.
IN_VENV := PATH="$(CURDIR)/$(VENV_BIN):$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)"
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# Debian packages the tests start for real: Chromium (dashboard), Prometheus + promtool (scrape, alert rules),
# docker-compose (compose file validation), nginx/HAProxy/Caddy/wrk (benchmarks), Redis and PostgreSQL (L4),
# ApacheBench (apache2-utils: an HTTP/1.0 keep-alive client);
# python3-venv, without which Debian's own Python cannot create .venv.
DEBIAN_PACKAGES := chromium prometheus docker-compose nginx-light haproxy caddy wrk redis-server postgresql \
	curl ca-certificates apache2-utils python3-venv

.PHONY: run test deps python-deps venv lint bench

deps:
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; \
	else \
		echo "apt-get not found: install these yourself: $(DEBIAN_PACKAGES)"; \
	fi

# The venv. Debian's Python ships `venv` without `ensurepip` unless python3-venv is installed: on a failure,
# install it where apt exists (`make run` does not go through `deps`) and try once more.
$(VENV_PYTHON):
	@$(PYTHON) -m venv $(VENV) >/dev/null 2>&1 || { \
		rm -rf $(VENV); \
		if command -v apt-get >/dev/null; then \
			echo "$(PYTHON) -m venv failed: installing Debian's python3-venv"; \
			$(SUDO) apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends python3-venv >/dev/null; \
		fi; \
		$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }; \
	}
	@$(VENV_PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, {sys.version.split()[0]} found: make PYTHON=python3.11 (and rm -rf $(VENV))"'

venv: $(VENV_PYTHON)

# Stamps, so a second `make run`/`make test` does not reinstall; they are redone when pyproject.toml changes.
$(VENV)/.installed-run: pyproject.toml | $(VENV_PYTHON)
	$(PIP) install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV_PYTHON)
	$(PIP) install -q -e '.[test,bench]'
	@touch $@ $(VENV)/.installed-run

python-deps: $(VENV)/.installed-test

run: $(VENV)/.installed-run
	$(IN_VENV) $(VENV_BIN)/sidecar run --config config/sidecar.yaml --demo

test: deps python-deps
	$(IN_VENV) $(VENV_PYTHON) -m pytest -q

lint: python-deps
	$(IN_VENV) $(VENV_BIN)/ruff check .
	$(IN_VENV) $(VENV_BIN)/ruff format --check .
	$(IN_VENV) $(VENV_BIN)/mypy

bench: deps python-deps
	$(IN_VENV) $(VENV_PYTHON) tests/benchmarks/bench.py
