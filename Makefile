# One-command set-up: `make test` and `make demo` create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Eight fake CPU devices so sharding is exercised without accelerators.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
PYTEST_ARGS ?= -n 2 --dist loadgroup
# Where `make demo` writes and `make notebooks` reads: WORKDIR=/path picks another.
DEMO_DIR = $(or $(WORKDIR),/tmp/twinbrain_demo)

.PHONY: install test test-all demo notebooks bench clean lerobot-fixtures

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/constraints.txt --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[test,sim,tf,notebook]'
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
	XLA_FLAGS= $(PY) scripts/demo.py --workdir=$(DEMO_DIR)

# Every notebook run top to bottom by a Jupyter kernel on `make demo`'s work dir (same WORKDIR) and
# written back with its outputs; a notebook whose run fails is left as it was.
notebooks: $(STAMP)
	@test -d $(DEMO_DIR)/eval || { echo "error: no demo in $(DEMO_DIR): run \`make demo$(if $(WORKDIR), WORKDIR=$(WORKDIR))\` first"; exit 1; }
	QUICKSTART_WORKDIR=$(DEMO_DIR) METAWORLD_RESULTS=$(DEMO_DIR)/eval XLA_FLAGS= \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	  --ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.record_timing=False notebooks/*.ipynb

# LeRobot datasets written by LeRobot's own code (lerobot 0.4.4 -> v3.0, 0.3.3 -> v2.1, each in
# its own environment: their torch/numpy pins do not fit the project's lock), regenerated into
# build/lerobot-fixtures and compared with the project's reader. To replace the committed
# fixtures: .venv-lerobot*/bin/python scripts/make_lerobot_fixtures.py --out=tests/data/lerobot
LEROBOT_OUT ?= build/lerobot-fixtures
.venv-lerobot/.installed: requirements/lerobot-0.4.4.txt
	test -x .venv-lerobot/bin/python || $(PYTHON) -m venv .venv-lerobot
	.venv-lerobot/bin/python -m pip install -q --no-deps -r requirements/lerobot-0.4.4.txt
	touch $@
.venv-lerobot21/.installed: requirements/lerobot-0.3.3.txt
	test -x .venv-lerobot21/bin/python || $(PYTHON) -m venv .venv-lerobot21
	.venv-lerobot21/bin/python -m pip install -q --no-deps -r requirements/lerobot-0.3.3.txt
	touch $@

lerobot-fixtures: $(STAMP) .venv-lerobot/.installed .venv-lerobot21/.installed
	rm -rf $(LEROBOT_OUT)
	.venv-lerobot/bin/python scripts/make_lerobot_fixtures.py --out=$(LEROBOT_OUT)
	.venv-lerobot21/bin/python scripts/make_lerobot_fixtures.py --out=$(LEROBOT_OUT)
	LEROBOT_FIXTURES=$(abspath $(LEROBOT_OUT)) $(PY) -m pytest tests/test_data_lerobot.py -n 0

clean:
	rm -rf $(VENV) .pytest_cache
