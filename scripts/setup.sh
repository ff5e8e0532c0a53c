#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with the pinned torch pair and the project (editable, with test
# extras). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import tlcm_core, prefect, diffusers, moto, xdist, lpips, open_clip, torchmetrics, torch_fidelity" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned (requirements/torch-cpu.txt): the pair that installs from local disk here, no CUDA download
  .venv/bin/python -m pip install -q -r requirements/torch-cpu.txt
  .venv/bin/python -m pip install -q -c requirements/torch-cpu.txt -e '.[test,metrics]'
fi
.venv/bin/python -c "import torch, tlcm_core; print(f'tlcm ready: torch {torch.__version__}, python at .venv/bin/python')"
