# corevisor: the two commands of the README, and the steps behind them.
#   make demo   set up (system packages, venv, bundled guests) and run the demo
#   make test   set up and run the whole test suite
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test setup sysdeps sysdeps-demo guests lint bench fuzz clean

# Seconds per fuzz target for `make fuzz` (CI passes a small budget).
FUZZ_SECONDS ?= 180

demo: sysdeps-demo $(STAMP) guests
	$(VENV)/bin/corevisor run

test: setup
	$(PY) -m pytest -q

setup: sysdeps $(STAMP) guests

# System packages, installed only when missing: a compiler and binutils for the guests
# (all the demo needs); for the tests and benchmarks also QEMU, gdb, ACPICA, cpio,
# busybox, a Linux kernel, iproute2 and ping (scripts/install-system-deps says which).
sysdeps:
	@./scripts/install-system-deps test

sysdeps-demo:
	@./scripts/install-system-deps demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	touch $@

guests:
	$(MAKE) -s -C guests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench fuzz
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run.py

# Every fuzz target (fuzz/targets/) for FUZZ_SECONDS each; prints executions per target
# and fails if any target crashed (the input is left in fuzz/work/crashes).
fuzz: setup $(VENV)/.fuzz-installed
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

# atheris only for fuzzing: the demo and the tests do not need it.
$(VENV)/.fuzz-installed: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[dev,fuzz]'
	touch $@

clean:
	$(MAKE) -s -C guests clean
	rm -rf $(VENV) bench/results fuzz/work
