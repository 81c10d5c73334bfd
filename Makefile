# lazypull: `make demo` runs the main job on embedded defaults, `make test` runs every test.
# Both install what they need on a fresh Debian 12 machine (as root).

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test deps lint bench clean

deps: $(STAMP)

# lazypull goes in as a path entry, as a deployed install has, not setuptools' import-hook
# finder: that one costs every lazypull process (the pull client too) 20-30 ms of its start.
$(STAMP): pyproject.toml tools/install-system-deps.sh
	tools/install-system-deps.sh
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

demo: deps
	$(PYTHON) -m demo

lint: deps
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest

# The cold-start benchmark: lazypull, stargz-snapshotter and a full pull side by side
# (perf/results/cold-start.{json,md} and -ready.png, -phases.png); BENCH_ARGS adds options.
BENCH_ARGS ?=
bench: deps
	$(PYTHON) -m perf cold-start --with-stargz $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
