# Set-up and the two everyday commands. `make venv` is idempotent: it creates .venv when missing
# and (re)installs the package with its test extra whenever setup.py changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build; diffusers would otherwise pull a CUDA torch.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/distill-jax demo --workdir workdir/demo

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
