# metac developer entry points.  Everything that needs the toolchain depends on
# `setup` (scripts/install-deps.sh): idempotent, and fast when nothing changed.
#
#   make run  [NODE_ARGS=...]     install everything, run a node in the foreground
#   make test [PYTEST_ARGS=...] [TESTS=...]
#                                 install everything, lint, run the test suite (or the
#                                 paths named in PYTEST_ARGS or TESTS; default: tests)
#   make guest-kernel             fetch the QEMU guest tests' kernel now (they otherwise
#                                 fetch it when first run; the node never needs it)
#   make lint | bench | clean | install-unit [NODE_ARGS=...]

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        := $(CURDIR)/.venv
PY          := $(VENV)/bin/python
NODE_ARGS   ?=
PYTEST_ARGS ?=
# The test paths to run. Empty: `tests`, unless a word of PYTEST_ARGS is an existing
# file or directory (tests/unit, tests/unit/test_refs.py::test_parse), which then narrows the run.
TESTS       ?=
UNIT_DIR    ?= /etc/systemd/system
UNIT        := metac-node.service
# bench/ (or tests/) may not exist in a fresh clone: git keeps no empty folders.
LINT_PATHS  := $(wildcard src tests bench)

.PHONY: help setup run test lint bench clean install-unit guest-kernel

help:
	@echo "targets: setup run test lint bench clean install-unit guest-kernel"
	@echo "  make run NODE_ARGS='...'      run 'metac node run' in the foreground"
	@echo "  make test PYTEST_ARGS='...'   ruff + pytest (a path in PYTEST_ARGS, or TESTS=PATHS, narrows the run)"

setup:
	bash scripts/install-deps.sh

run: setup
	exec $(VENV)/bin/metac node run $(NODE_ARGS)

lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)

# pytest exit 5 means "no tests collected": reported loudly but not a failure.
# Any other non-zero status fails the target (and so `make test`).
test: lint
	set -- $(PYTEST_ARGS); paths='$(TESTS)'; \
	if [ -z "$$paths" ]; then \
		paths=tests; \
		for a in "$$@"; do \
			case "$$a" in -*) ;; *) if [ -e "$${a%%::*}" ]; then paths=; fi ;; esac; \
		done; \
	fi; \
	rc=0; $(PY) -m pytest -q -rs "$$@" $$paths || rc=$$?; \
	if [ "$$rc" -eq 5 ]; then echo "WARNING: pytest collected no tests"; exit 0; fi; \
	exit "$$rc"

bench: setup
	shopt -s nullglob; scripts=(bench/bench_*.py); \
	if [ "$${#scripts[@]}" -eq 0 ]; then echo "bench: no bench/*.py scripts"; exit 0; fi; \
	for s in "$${scripts[@]}"; do echo "== $$s"; $(PY) "$$s"; done

guest-kernel:
	bash scripts/guest-kernel.sh

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
