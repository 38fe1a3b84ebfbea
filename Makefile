# One-command set-up: `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Eight fake CPU devices so sharding is exercised without accelerators.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: install test test-all demo bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/constraints.txt --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[test,sim,tf]'
	# The real openpi client for the server tests: without its numpy<2 pin (see pyproject.toml).
	$(PY) -m pip install -q --no-deps -c requirements/constraints.txt openpi-client
	touch $(STAMP)

install: $(STAMP)

# Default run: everything except tests marked slow. pytest exits non-zero (5) when no test ran.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# One CPU device: the demo's batches are small, and 8 fake devices would split them 8 ways.
demo: $(STAMP)
	XLA_FLAGS= $(PY) scripts/demo.py --workdir=$(or $(WORKDIR),/tmp/twinbrain_demo)

clean:
	rm -rf $(VENV) .pytest_cache
