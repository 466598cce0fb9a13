# The contract: `make run` and `make test` (both set up .venv/ and .venv-verl/ first when needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
# Second environment: verl's FSDP engine on CPU (tests/engines/test_verl_engine.py runs its ranks with it). No trl:
# with trl 1.16 installed, verl 0.9.1's models/transformers/monkey_patch.py fails to build any FSDP model.
VENV_VERL := .venv-verl
PY_VERL := $(VENV_VERL)/bin/python
STAMP_VERL := $(VENV_VERL)/.setup-done

.PHONY: setup test run bench clean

setup: $(STAMP) $(STAMP_VERL)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev,real]'
	touch $(STAMP)

# about 2 min 40 s on 2 CPU cores from the local wheel cache, 1.9 GB
$(STAMP_VERL): pyproject.toml constraints-cpu.txt
	test -x $(PY_VERL) || $(PYTHON) -m venv $(VENV_VERL)
	$(PY_VERL) -m pip install -q --upgrade pip
	$(PY_VERL) -m pip install -q torch==2.13.0
	$(PY_VERL) -m pip install -q -c constraints-cpu.txt -e '.[verl-engine]'
	! $(PY_VERL) -c "import trl" 2>/dev/null
	touch $(STAMP_VERL)

test: setup
	RLVR_ENTROPY_REQUIRE_VERL_ENV=1 $(PY) -m pytest -q

run: setup
	$(VENV)/bin/rlvr-entropy demo

bench: setup
	$(PY) benchmarks/bench_top_p_entropy.py

clean:
	rm -rf $(VENV) $(VENV_VERL) build src/*.egg-info
