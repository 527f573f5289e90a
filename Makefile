# Seawall: everything a fresh Debian/Ubuntu machine needs, in two commands (see README.md).
#   make run    install, then start the sidecar on config/sidecar.yaml with a built-in demo upstream
#   make test   install everything the suite needs, then run it
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# Debian packages the tests start for real: Chromium (dashboard), Prometheus + promtool (scrape, alert rules),
# docker-compose (compose file validation), nginx/HAProxy/Caddy/wrk (benchmarks), Redis and PostgreSQL (L4).
DEBIAN_PACKAGES := chromium prometheus docker-compose nginx-light haproxy caddy wrk redis-server postgresql \
	curl ca-certificates

.PHONY: run test deps python-deps lint bench

deps:
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; \
	else \
		echo "apt-get not found: install these yourself: $(DEBIAN_PACKAGES)"; \
	fi

python-deps:
	$(PIP) install -q -e '.[test,bench]'

run:
	$(PIP) install -q -e .
	sidecar run --config config/sidecar.yaml --demo

test: deps python-deps
	$(PYTHON) -m pytest -q

lint:
	ruff check .
	ruff format --check .
	mypy

bench: deps python-deps
	$(PYTHON) tests/benchmarks/bench.py
