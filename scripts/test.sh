#!/usr/bin/env bash
# The full test suite (unit, stage, integration with a real Prefect server + worker and a local S3 endpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two workers (TLCM_TEST_WORKERS; 0 runs in this process): each takes whole test files, so a file's module fixtures
# are built once. Two CPU-bound workers on two cores take 20 min where one takes 30 (bench/RESULTS.md).
exec .venv/bin/python -m pytest -p no:cacheprovider -n "${TLCM_TEST_WORKERS:-2}" --dist loadfile "$@"
