#!/usr/bin/env bash
# One prepared GPU check for DEQ fusion (issue: CPU/GPU agreement and speed). Run on a machine with a CUDA GPU from
# the repository root; results go to ${OUT:-gpu_check}/. On the workplace's lent GPU machine first install the wheels of
# ../shared/wheels (copied to .whl/, see its README). About 5 minutes on one H200.
set -euo pipefail
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. training-step time of late fusion vs DEQ (eager, fixed-iteration, phantom) at the four shapes of the paper
python scripts/bench_fusion.py --device cuda --steps 20 --warmup 5 --out "$OUT/deq_bench_gpu.md" 2>&1 | tee "$OUT/bench.log"
# 2. the default command on GPU and on CPU, same seed: both must select a checkpoint from the trained phase
for t in gpu cpu; do
  python train.py trainer=$t logger=csv trainer.enable_progress_bar=false hydra.run.dir="$OUT/default_$t" > "$OUT/default_$t.log" 2>&1
  python - "$OUT/default_$t/metrics.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[1], "test acc %.1f" % (100 * r["metrics"]["test/acc"]), "selected epoch", r["best_val"]["epoch"],
      "of", r["epochs_trained"], "test solves converged", r["deq_solver"]["test_forward"]["converged"])
PY
done
