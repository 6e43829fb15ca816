#!/usr/bin/env bash
# make gpu-check: every GPU test, the benchmarks beside the peer and the planner's boundary, in one command
# (scripts/gpu_check.py says what runs). On the GPU machine (no network) the wheels it lacks come from
# .wheels/ (make gpu-wheels, here) and are installed into a folder put on PYTHONPATH, never over its torch.
#   scripts/gpu_check.sh              the GPU check; results in $OUT (else gpu-results/)
#   scripts/gpu_check.sh --cpu-smoke  the same parts on the CPU with the tiny shape (run by the test suite)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=gpu
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu-smoke ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [[ $MODE == gpu ]] && compgen -G ".wheels/*.whl" > /dev/null; then
  SITE=${QLORA_LITE_WHEEL_SITE:-/tmp/qlora-lite-site}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .wheels/*.whl \
    || { echo "gpu-check: installing .wheels/ failed"; exit 2; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi > /dev/null && nvidia-smi
exec "$PY" scripts/gpu_check.py --mode "$MODE" "${ARGS[@]}"
