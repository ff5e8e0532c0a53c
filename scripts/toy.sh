#!/usr/bin/env bash
# Set up (once) and run the whole pipeline on the built-in toy world on this machine's CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/tlcm ] || ./scripts/setup.sh
# OMP_NUM_THREADS: measured, 2 threads on a busy 2-core machine ran 8x slower
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1
exec .venv/bin/tlcm distill --config "${CONFIG:-toy}" --progress "$@"
