# ferryman: `make test` and `make demo` are the two commands (as root, on Debian 12/13).
# Each target runs scripts/setup-host first; on a ready host that is a sub-second check.

VENV ?= $(CURDIR)/.venv
PYTEST_ARGS ?=
SETUP_ARGS ?=
DEMO_ARGS ?=
PYTHON := $(VENV)/bin/python

# CRIU >= 4.2.1 is installed to /usr/local/sbin and must win over Debian's older /usr/sbin/criu.
export PATH := /usr/local/sbin:/usr/local/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup check-host test static static-only demo lint typecheck lint-imports bench verify-unit

help:
	@echo "make setup        install/verify host packages, CRIU, the venv ($(VENV)) and stubs"
	@echo "make check-host   verify the host only, change nothing"
	@echo "make test         setup, the static checks, then the whole pytest suite (PYTEST_ARGS=...)"
	@echo "make static       ruff, mypy and lint-imports (the import contracts), failing on any finding"
	@echo "make demo         setup, then scripts/demo (DEMO_ARGS=--keep leaves the fleet up)"
	@echo "make lint         ruff check"
	@echo "make typecheck    mypy"
	@echo "make lint-imports the import contracts in pyproject.toml (import-linter)"
	@echo "make bench        setup, then every bench/*.py"
	@echo "make verify-unit  systemd-analyze verify the agent and coordinator units"

setup:
	scripts/setup-host --venv $(VENV) $(SETUP_ARGS)

check-host:
	scripts/setup-host --venv $(VENV) --check

# The static checks run first (seconds); any finding fails the target before the suite starts.
# tests/etcd runs as a pytest process of its own (why: tests/conftest.py, ETCD_RUN).
# pytest's exit code fails the recipe as it is, including 5 (no tests collected).
# --durations lists the slowest tests at the end: CI's time budget is watched from that list.
test: setup
	$(MAKE) --no-print-directory static-only
	$(VENV)/bin/pytest -q --durations=40 $(PYTEST_ARGS)
ifeq ($(PYTEST_ARGS),)
	FERRYMAN_ETCD_TESTS=1 $(VENV)/bin/pytest -q tests/etcd
endif

static: setup static-only

static-only:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

demo: setup
	@test -f scripts/demo || { echo "scripts/demo does not exist yet" >&2; exit 1; }
	$(PYTHON) scripts/demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

lint-imports: setup
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	@set -e; found=0; \
	for f in bench/*.py; do \
		[ -f "$$f" ] || continue; \
		case "$$(basename "$$f")" in _*|conftest.py) continue ;; esac; \
		found=1; echo "==> $(PYTHON) $$f"; $(PYTHON) "$$f"; \
	done; \
	[ $$found = 1 ] || echo "no benchmarks in bench/"

# Verifies the unit against a scratch root holding the host's units plus a stub ExecStart binary,
# so the check neither needs /opt/ferryman installed nor touches the real system. Any message
# from systemd-analyze (unknown key, bad value, missing dependency) fails the target.
verify-unit:
	@command -v systemd-analyze >/dev/null || { echo "systemd-analyze missing: apt-get install systemd" >&2; exit 1; }
	@set -e; for unit in ferryman-agent ferryman-coordinator; do \
	root=$$(mktemp -d); \
	mkdir -p "$$root/etc/systemd/system" "$$root/usr/lib/systemd" "$$root/opt/ferryman/venv/bin"; \
	cp -a /usr/lib/systemd/system "$$root/usr/lib/systemd/"; \
	cp systemd/$$unit.service "$$root/etc/systemd/system/"; \
	printf '#!/bin/sh\nexit 0\n' >"$$root/opt/ferryman/venv/bin/$$unit"; \
	chmod 0755 "$$root/opt/ferryman/venv/bin/$$unit"; \
	rc=0; out=$$(systemd-analyze verify --root="$$root" /etc/systemd/system/$$unit.service 2>&1) || rc=$$?; \
	rm -rf "$$root"; \
	if [ -n "$$out" ] || [ "$$rc" != 0 ]; then echo "$$out" >&2; exit 1; fi; \
	echo "systemd/$$unit.service: verified (systemd $$(systemd-analyze --version | awk 'NR==1 {print $$2}'))"; \
	done
