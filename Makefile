PY ?= python3
MODEL ?= vit_b_16

.PHONY: install run test test-gpu

install:
	bash scripts/install.sh

# The main job on a default model.
run: install
	$(PY) -m attnkit analyze $(MODEL)

# The CPU test suite (GPU tests skip themselves without CUDA).
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

# On the GPU machine: only the GPU-marked tests.
test-gpu:
	$(PY) -m pytest -q -m "gpu or multi_gpu"
