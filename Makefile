# Two entry points (see README): `make run` installs dao and starts the mirror on embedded defaults;
# `make test` installs every test dependency (apt + pip) and runs the whole suite in a private network namespace.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_RUN := python3 python3-venv python3-pip
APT_TEST := $(APT_RUN) docker.io containerd docker-registry skopeo busybox-static iproute2 util-linux ca-certificates \
	postgresql redis-server chromium curl
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LISTEN ?= 127.0.0.1:5000
DATA_DIR ?= $(CURDIR)/.dao-data

APT_BENCH := $(APT_TEST) nginx-light

.PHONY: run test install install-dev apt-run apt-test apt-bench lint bench

run: install
	$(VENV)/bin/dao mirror serve --listen $(LISTEN) --data-dir $(DATA_DIR)

test: install-dev apt-test lint
	tests/services/isolated.sh $(VENV)/bin/pytest -q -p no:cacheprovider --durations=15  # (the slowest, to keep it fast)

# The accelerator's benchmark against the CNCF registry's proxy mode (several minutes; see docs/benchmarks.md).
bench: install-dev apt-bench
	$(PY) bench/mirror_vs_distribution.py $(BENCH_ARGS)

lint:
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports

install: apt-run
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m compileall -q src >/dev/null  # the bytecode a wheel install has (none is written under PYTHONDONTWRITEBYTECODE)

install-dev: apt-run
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PY) -m pip install -q -e '.[dev]'
	$(PY) -m compileall -q src >/dev/null

apt-run:
	@missing=$$(for p in $(APT_RUN); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; fi

apt-test:
	@missing=$$(for p in $(APT_TEST); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

apt-bench:
	@missing=$$(for p in $(APT_BENCH); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
