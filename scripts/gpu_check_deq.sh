#!/usr/bin/env bash
# One prepared GPU check for DEQ fusion: the CUDA-graph fast path against the eager one, training-step speed
# against late fusion, and the default command on GPU and CPU with the same seed. Run from the repository root on
# a machine with a CUDA GPU; results go to ${OUT:-gpu_check}/. About 5 minutes on one H200. On the workplace's
# lent GPU machine first copy ../shared/wheels/*.whl to .whl/ and name .whl in the run's carry.
#   PARTS="tests bench default" (default: all three)   SEEDS="0 1 2 3 4" (default "0"; seeds run in parallel)
#   VARIANTS="gpu gpu_graph cpu" (default: all three): the default command eager on the GPU, with CUDA graphs, on the CPU
set -uo pipefail
PARTS=${PARTS:-tests bench default}
SEEDS=${SEEDS:-0}
VARIANTS=${VARIANTS:-gpu gpu_graph cpu}
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
# shellcheck source=scripts/gpu_env.sh
source scripts/gpu_env.sh

if [[ " $PARTS " == *" tests "* ]]; then
  echo "== 1. graph path vs eager path (tests marked gpu) and the CPU DEQ tests" | tee -a "$LOG"
  timeout 150 python3 -m pytest -q tests/test_deq_graph.py tests/test_deq.py 2>&1 | grep -vE "SyntaxWarning|^ +\"\"\"$" | tail -40 | tee -a "$LOG"
fi

if [[ " $PARTS " == *" bench "* ]]; then
  echo "== 2. training-step time at the paper's four shapes" | tee -a "$LOG"
  timeout 200 python3 scripts/bench_fusion.py --device cuda --steps 20 --warmup 5 --out "$OUT/deq_bench_gpu.md" 2>&1 | tee -a "$LOG"
fi

run_default() {  # name, seed, overrides...: one run, its record summarised in the log and collected in records.jsonl
  local name=$1 seed=$2; shift 2
  local dir=/tmp/default_${name}_$seed start=$SECONDS
  OMP_NUM_THREADS=2 timeout 240 python3 train.py logger=csv trainer.enable_progress_bar=false seed=$seed hydra.run.dir=$dir "$@" \
    > "$dir.log" 2>&1
  echo "$name seed $seed: exit $? after $((SECONDS - start)) s ($*)" >> "$dir.summary"
  python3 - "$dir/metrics.json" "$name" "$seed" "$OUT/records.jsonl" <<'PY' >> "$dir.summary" 2>&1
import json, sys
path, name, seed, out = sys.argv[1:]
r = json.load(open(path))
s = r.get("deq_solver", {}).get("test_forward", {})
print(f"{name} seed {seed}: test acc {100 * r['metrics']['test/acc']:.1f}, selected epoch {r['best_val']['epoch']} of "
      f"{r['epochs_trained']}, test solves converged {s.get('converged')}, rel residual {s.get('rel_residual')}")
keep = {"name": name, "seed": int(seed), "metrics": r["metrics"], "best_val": r["best_val"],
        "epochs_trained": r["epochs_trained"], "deq_solver": r.get("deq_solver")}
with open(out, "a") as f:
    f.write(json.dumps(keep) + "\n")
PY
}
if [[ " $PARTS " == *" default "* ]]; then
  echo "== 3. the default command on GPU (eager), GPU (CUDA graphs) and CPU; seeds $SEEDS, in parallel" | tee -a "$LOG"
  for seed in $SEEDS; do
    [[ " $VARIANTS " == *" gpu "* ]] && run_default gpu "$seed" trainer=gpu &
    [[ " $VARIANTS " == *" gpu_graph "* ]] && run_default gpu_graph "$seed" trainer=gpu fusion.fixed_iterations=true fusion.cuda_graph=true &
    [[ " $VARIANTS " == *" cpu "* ]] && run_default cpu "$seed" trainer=cpu &
  done
  wait
  cat /tmp/default_*.summary | tee -a "$LOG"
  grep -hiE "error|Traceback" /tmp/default_*.log | sort | uniq -c | head -10 | tee -a "$LOG"
  first=${SEEDS%% *}
  cp /tmp/default_gpu_$first/csv/metrics.csv "$OUT/default_gpu_curve.csv" 2>/dev/null
fi
echo "== done" | tee -a "$LOG"
