# corevisor: the two commands of the README, and the steps behind them.
#   make demo   set up (system packages, venv, bundled guests) and run the demo
#   make test   set up and run the whole test suite
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test lab-test setup sysdeps sysdeps-demo guests lint bench soak fuzz clean

# Seconds per fuzz target for `make fuzz` (CI passes a small budget).
FUZZ_SECONDS ?= 180

demo: sysdeps-demo $(STAMP) guests
	$(VENV)/bin/corevisor run

test: setup
	$(PY) -m pytest -q

setup: sysdeps $(STAMP) guests

# The tests that need hardware virtualization (marker lab; `make test` deselects them)
# and those that run on every KVM (marker portable: `make test` runs them on PVM, this
# runs them again on SVM), all in ONE boot of the lab's L1 guest: QEMU-TCG with an
# emulated AMD SVM CPU, where /dev/kvm is kvm_amd with nested paging (lab/README.md,
# docs/lab.md). No pytest cache (the root is read-only there) and no hypothesis plugin
# (seconds to import there). The expression is tests/conftest.py's LAB_SELECTION.
LAB_PYTEST := -m "lab or portable" -p no:cacheprovider -p no:hypothesispytest -q -rA --durations=0
# A lab boot that times out (status 124: the L1 guest stopped making progress, the
# QEMU-TCG stall of docs/lab.md, seen in about 1 run of 4 on 2026-12-01) is said and
# booted once more; a test that fails is never retried. Worst case ~2 x 17 min.
LAB_RUN := lab/run --iommu --timeout 1000 -- $(PY) -m pytest $(LAB_PYTEST) tests
lab-test: setup
	@$(LAB_RUN); s=$$?; if [ $$s -eq 124 ]; then \
	  echo "lab-test: the lab timed out (an L1 stall, docs/lab.md): one more boot" >&2; \
	  $(LAB_RUN); else exit $$s; fi

# System packages, installed only when missing: a compiler and binutils for the guests
# (all the demo needs); for the tests and benchmarks also QEMU, gdb, ACPICA, cpio,
# busybox, a Linux kernel, iproute2 and ping (scripts/install-system-deps says which).
sysdeps:
	@./scripts/install-system-deps test

sysdeps-demo:
	@./scripts/install-system-deps demo

$(STAMP): pyproject.toml setup.py src/corevisor/sandbox/_sigsys.c
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	touch $@

guests:
	$(MAKE) -s -C guests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench fuzz lab
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run.py

# Crash-and-restart and pause/resume loops in one sandboxed VMM, checking that fds,
# threads and RSS stay flat: SOAK_MINUTES (default 10) minutes (scripts/soak).
soak: setup
	SOAK_MINUTES=$(or $(SOAK_MINUTES),10) $(PY) scripts/soak

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
