#!/usr/bin/env bash
# Installs attnkit into $PY's environment: `runtime` (what `attnkit analyze` needs) or `dev`
# (runtime plus the test tools). Creates the venv when $PY is a venv's python that does not exist
# yet. Keeps an existing torch: a fresh CPU machine gets the CPU build torch==2.13.0 (a local
# wheel on our machines; a plain `pip install torch` pulls GBs of CUDA packages), a GPU box keeps
# its own. UPGRADE=1 upgrades every other dependency to its newest release (`make test-latest`).
set -euo pipefail
extras=${1:-runtime}
PY=${PY:-${PYTHON:-python3}}
if [[ ! -x "$PY" && "$PY" == */bin/python ]]; then
    python3 -m venv "$(dirname "$(dirname "$PY")")"
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet "setuptools>=64"
target="."
[[ "$extras" == dev ]] && target=".[dev]"
[[ "$extras" == runtime ]] && target=".[models]"
upgrade=()
if [[ "${UPGRADE:-0}" == 1 ]]; then
    keep_torch=$(mktemp)
    "$PY" -c "import torch; print('torch==' + torch.__version__)" >"$keep_torch"
    upgrade=(--upgrade --upgrade-strategy eager --constraint "$keep_torch")
fi
"$PY" -m pip install --quiet "${upgrade[@]}" --no-build-isolation -e "$target"
"$PY" -c "import torch, transformers; print(f'attnkit installed: torch {torch.__version__}, transformers {transformers.__version__}')"
