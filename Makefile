PY ?= python3
MODEL ?= vit_b_16

.PHONY: install run test test-timing test-gpu

install:
	bash scripts/install.sh

# The main job on a default model.
run: install
	$(PY) -m attnkit analyze $(MODEL)

# The CPU test suite (GPU tests skip themselves without CUDA; wall-clock tests run separately).
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not timing"

# Wall-clock budgets (e.g. `attnkit analyze vit_b_16` under 15 s): run on an idle machine.
test-timing: install
	$(PY) -m pytest -q -m timing

# On the GPU machine: only the GPU-marked tests.
test-gpu:
	$(PY) -m pytest -q -m "gpu or multi_gpu"
