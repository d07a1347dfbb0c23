#!/usr/bin/env bash
# One prepared GPU window for Pro-Fusion Table 4's transformer cells (LF-Transformer, MulT, EF-Transformer, base
# and Pro-Fusion, three sectors): (1) the step time of each model on the GPU, per-stock encoders one after another
# and stacked (scripts/bench_stocks.py), then (2) the cells themselves, PARALLEL training processes at once on the
# one GPU (scripts/run_queue.py: seed-major, so base and Pro rows fill on the same seeds first; no job starts after
# BUDGET seconds, so the window ends with whole runs). Finished runs' record files land in $OUT/runs/ (copy them
# to results/runs/ and run `make tables`); cells with a record in results/runs are skipped, so a second window
# continues where the first stopped. Run from the repository root; on the workplace's lent machine copy
# ../shared/wheels/*.whl to .whl/ first and name .whl in the run's carry.
#   PARALLEL=8  SEEDS=0-4  BUDGET=420 (s)  MODELS="lftransf mult eftransf"  SECTORS="fnb health tech"  PARTS="bench runs"
set -uo pipefail
OUT=${OUT:-gpu_stocks}
PARALLEL=${PARALLEL:-8}
SEEDS=${SEEDS:-0-4}
BUDGET=${BUDGET:-420}
MODELS=${MODELS:-lftransf mult eftransf}
SECTORS=${SECTORS:-fnb health tech}
PARTS=${PARTS:-bench runs}
mkdir -p "$OUT"
LOG="$OUT/gpu_stocks.log"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh

if [[ " $PARTS " == *" bench "* ]]; then
  echo "== 1. train-step time per model on the GPU (F&B), per-stock vs stacked encoders" | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout 150 python3 scripts/bench_stocks.py --device cuda --models $MODELS --variants base pro --steps 10 \
    --warmup 3 --repeats 2 --out "$OUT/pro_t4_timing_gpu.md" 2>&1 | tail -30 | tee -a "$LOG"
fi

if [[ " $PARTS " == *" runs "* ]]; then
  echo "== 2. Table 4 transformer cells, $PARALLEL at once, seeds $SEEDS, no start after ${BUDGET} s" | tee -a "$LOG"
  patterns=()
  for sector in $SECTORS; do for model in $MODELS; do patterns+=("pro_t4_${sector}_${model}_*"); done; done
  python3 scripts/run_queue.py "${patterns[@]}" --seeds "$SEEDS" --parallel "$PARALLEL" --deadline "$BUDGET" \
    --collect "$OUT" --logs "$OUT/logs" --python python3 -- trainer=gpu logger=csv trainer.enable_progress_bar=false \
    2>&1 | tee -a "$LOG"
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv | tee -a "$LOG"
fi
