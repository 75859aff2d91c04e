# The two commands of the README. Each installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tally serve

test: $(STAMP)
	scripts/test

# Every figure of the throughput issue in one run (bench/run.py says how); BENCH_ARGS="--quick --only P1,P3".
# Installs wrk (Debian's package) when missing; starts and removes its own Redis and scratch database.
bench: $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)
