# corevisor: the two commands of the README, and the steps behind them.
#   make demo   set up (system packages, venv, bundled guests) and run the demo
#   make test   set up and run the whole test suite
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test setup sysdeps guests lint bench clean

demo: setup
	$(VENV)/bin/corevisor run

test: setup
	$(PY) -m pytest -q

setup: sysdeps $(STAMP) guests

# System packages: a compiler and binutils for the guests, QEMU for the side-by-side
# reference runs, gdb for the debugging tests. Installed only when missing.
sysdeps:
	@./scripts/install-system-deps

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

guests:
	$(MAKE) -s -C guests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/run.py

clean:
	$(MAKE) -s -C guests clean
	rm -rf $(VENV) bench/results
