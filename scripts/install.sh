#!/usr/bin/env bash
# Installs attnkit and its test tools without touching an existing torch.
# A fresh CPU machine gets the CPU build torch==2.13.0 (a local wheel on our
# machines); a machine that already has torch (a GPU box) keeps its own.
set -euo pipefail
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "setuptools>=64"
"$PY" -m pip install --quiet --no-build-isolation -e ".[dev]"
