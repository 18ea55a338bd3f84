# Set-up and the two everyday commands. `make venv` is idempotent: it creates .venv when missing
# and (re)installs the package whenever setup.py changes or ACCEL differs from the last install.
#   make venv               cpu (default): torch CPU build + the test extra; what `make test` needs
#   make venv ACCEL=tpu     Cloud TPU VM: jax[tpu] (libtpu from PyPI)
#   make venv ACCEL=cuda    NVIDIA GPU: jax[cuda12] (CUDA 12 wheels from PyPI; needs only a driver)
# tpu/cuda install the trainer only, no torch and no test extra. Not `.[test,cuda]` either: the
# suite is a CPU suite (8 fake host devices via XLA_FLAGS, CPU float32 parity tolerances) that a GPU
# backend would not reproduce, and the test extra's torch would bring a second set of nvidia-* CUDA
# wheels whose pins need not agree with jax-cuda12-plugin's.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ACCEL ?= cpu
ACCELS := cpu tpu cuda
STAMP = $(VENV)/.installed-$(ACCEL)

# Exactly one word, and one of $(ACCELS).
ifneq ($(words $(ACCEL))$(filter $(ACCELS),$(ACCEL)),1$(strip $(ACCEL)))
$(error ACCEL='$(ACCEL)' is not one of: $(ACCELS) (e.g. make venv ACCEL=tpu))
endif

.PHONY: venv demo test lint clean

venv: $(STAMP)

# One stamp per ACCEL; the other ACCELs' stamps are removed so switching back reinstalls.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(ACCEL),cpu)
	# torch first and pinned: the CPU build; diffusers would otherwise pull a CUDA torch.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
else
	$(PY) -m pip install -q -e ".[$(ACCEL)]"
endif
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $(STAMP)

demo: venv
	$(VENV)/bin/distill-jax demo --workdir workdir/demo

# Two workers, a test file each (module fixtures are built once): the suite is mostly XLA
# compiles, which leave the second core idle in one process. WORKERS=1 runs it in one process.
WORKERS ?= 2
test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(if $(filter-out 1,$(WORKERS)),-n $(WORKERS) --dist loadfile) tests

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
