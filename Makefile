# The interpreter: the active virtual environment's, else a project venv `.venv` that `install`
# creates on first use (Debian's system Python refuses `pip install`: externally-managed-environment).
# On a machine whose python3 already holds torch (the GPU box): `make test-gpu PY=python3`.
ifdef VIRTUAL_ENV
PY ?= $(VIRTUAL_ENV)/bin/python
else
PY ?= .venv/bin/python
endif
export PY
MODEL ?= vit_b_16

.PHONY: install install-dev run test test-zoo test-latest test-timing test-gpu

# Runtime needs only (torch, transformers for the zoo, rich, typer, ...).
install:
	bash scripts/install.sh runtime

# Runtime plus the test tools.
install-dev:
	bash scripts/install.sh dev

# The main job on a default model.
run: install
	$(PY) -m attnkit analyze $(MODEL)

# The CPU test suite (GPU tests skip themselves without CUDA; wall-clock and full-size zoo tests run
# separately: the suite stays under 4 GB per worker).
test: install-dev
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not timing and not zoo"

# optimize's equivalence proof on every full-size zoo model (one process; 3-5 GB peak).
test-zoo: install-dev
	$(PY) -m pytest -q -m zoo

# The same suite against the newest release of every dependency but torch, in its own venv.
test-latest:
	$(MAKE) test PY=.venv-latest/bin/python UPGRADE=1

# Wall-clock budgets (e.g. `attnkit analyze vit_b_16` under 15 s): run on an idle machine.
test-timing: install-dev
	$(PY) -m pytest -q -m timing

# On the GPU machine: the CPU suite on its torch and transformers (8 workers), then the GPU-marked tests.
test-gpu:
	$(PY) -m pytest -q -n 8 --dist loadfile -m "not gpu and not multi_gpu and not timing and not zoo"
	$(PY) -m pytest -q -m "gpu or multi_gpu"
