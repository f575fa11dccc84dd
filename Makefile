# metac developer entry points.  Everything that needs the toolchain depends on
# `setup` (scripts/install-deps.sh): idempotent, and fast when nothing changed.
#
#   make run  [NODE_ARGS=...]     install everything, run a node in the foreground
#   make test [PYTEST_ARGS=...]   install everything, lint, run the test suite
#   make lint | bench | clean | install-unit [NODE_ARGS=...]

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        := $(CURDIR)/.venv
PY          := $(VENV)/bin/python
NODE_ARGS   ?=
PYTEST_ARGS ?=
UNIT_DIR    ?= /etc/systemd/system
UNIT        := metac-node.service
# bench/ (or tests/) may not exist in a fresh clone: git keeps no empty folders.
LINT_PATHS  := $(wildcard src tests bench)

.PHONY: help setup run test lint bench clean install-unit

help:
	@echo "targets: setup run test lint bench clean install-unit"
	@echo "  make run NODE_ARGS='...'      run 'metac node run' in the foreground"
	@echo "  make test PYTEST_ARGS='...'   ruff + pytest"

setup:
	bash scripts/install-deps.sh

run: setup
	exec $(VENV)/bin/metac node run $(NODE_ARGS)

lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)

# pytest exit 5 means "no tests collected": reported loudly but not a failure.
# Any other non-zero status fails the target (and so `make test`).
test: lint
	rc=0; $(PY) -m pytest -q -rs $(PYTEST_ARGS) tests || rc=$$?; \
	if [ "$$rc" -eq 5 ]; then echo "WARNING: pytest collected no tests"; exit 0; fi; \
	exit "$$rc"

bench: setup
	shopt -s nullglob; scripts=(bench/bench_*.py); \
	if [ "$${#scripts[@]}" -eq 0 ]; then echo "bench: no bench/*.py scripts"; exit 0; fi; \
	for s in "$${scripts[@]}"; do echo "== $$s"; $(PY) "$$s"; done

clean:
	rm -rf .venv build .pytest_cache .ruff_cache .hypothesis
	find . -path ./.git -prune -o \( -name '*.egg-info' -o -name __pycache__ \) -prune -exec rm -rf {} +

# Install packaging/metac-node.service with ExecStart pointing at this checkout's venv.
install-unit: setup
	install -d $(UNIT_DIR)
	sed 's|^ExecStart=/usr/local/bin/metac node run.*|ExecStart=$(VENV)/bin/metac node run $(NODE_ARGS)|' \
		packaging/metac-node.service > $(UNIT_DIR)/$(UNIT).tmp
	chmod 0644 $(UNIT_DIR)/$(UNIT).tmp && mv -f $(UNIT_DIR)/$(UNIT).tmp $(UNIT_DIR)/$(UNIT)
	@echo "installed $(UNIT_DIR)/$(UNIT) (ExecStart=$(VENV)/bin/metac node run $(NODE_ARGS))"
	@if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
		echo "start it with: systemctl enable --now $(UNIT)"; \
	else \
		echo "systemd is not running here: skipped 'systemctl daemon-reload'"; \
	fi
