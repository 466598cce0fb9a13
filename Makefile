# The contract: `make run` and `make test` (both set up .venv/ first when needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup test run bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

run: setup
	$(VENV)/bin/rlvr-entropy demo

bench: setup
	$(PY) benchmarks/bench_top_p_entropy.py

clean:
	rm -rf $(VENV) build src/*.egg-info
