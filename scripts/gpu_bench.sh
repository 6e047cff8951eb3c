#!/usr/bin/env bash
# One prepared GPU session: the CUDA tests, the layer benchmarks at batch 16 (optimal transport
# up to 1000 x 1000, robust pooling on 64 x 64 maps), and a short training run of each task per
# backward mode, in under 8 minutes, everything written to one folder.
#
#   scripts/gpu_bench.sh                    # CUDA; writes runs/gpu_bench/<UTC stamp>/
#   scripts/gpu_bench.sh --out DIR          # somewhere else
#   scripts/gpu_bench.sh --device cpu       # dry run: the same steps with tiny sizes, on the CPU
#
# Every step runs under its own time limit (the sum stays under 8 minutes), so a slow step
# costs its own results and not the others'; the benchmarks write each section as it finishes.
# The folder gets summary.md (machine, per-step status and time, the sweep tables), the CSVs
# and PNGs of each benchmark, the sweeps' CSV/README/PNG, offline W&B runs and one log per step.
# Exit status: 0 when every step succeeded, 1 otherwise (summary.md says which).
set -uo pipefail

DEVICE=cuda
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_bench.sh: unknown argument $1 (--device cuda|cpu, --out DIR)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_bench.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${OUT:-runs/gpu_bench/$(date -u +%Y%m%d-%H%M%S)-$DEVICE}"
mkdir -p "$OUT/logs"
export MPLBACKEND=Agg WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT=true
SUMMARY="$OUT/summary.md"
FAILED=0
START=$(date +%s)

if [ "$DEVICE" = cuda ]; then
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_bench.sh: torch sees no CUDA device (use --device cpu for a dry run)" >&2
    exit 2
  fi
  # Real sizes: the issue's batch-16 cases, and the paper's batch-1 OT case with POT beside it.
  # batch 16 up to 1000 x 1000, then Fig. 3(d) (memory vs iterations) at 500 x 500
  OT_B16=(--sizes 100 250 500 1000 --batch-sizes 16 --budget 0.3 --no-pot --target-size 500)
  # the paper's batch-1 case with POT's autograd Sinkhorn beside it (small iteration section)
  OT_B1=(--sizes 500 --batch-sizes 1 --budget 0.3 --target-size 50)
  POOL=(--sizes 8 16 32 64 --batch 16 --budget 0.3)
  TESTS=(-m cuda tests)
  TRAIN=(trainer.accelerator=gpu trainer.devices=1)
  CLS=(trainer.max_epochs=2)
  MATCH=(trainer.max_epochs=1 data.train_size=1024 model.threads=null)
  CLS_SEL=()
  MATCH_SEL=()
  LIMITS=(60 120 60 90 60 80)   # tests, OT b16, OT b1, pool, classification, matching: 470 s
else
  # --quick: sizes 12 and 24, batch 1 and 2, gamma 1 (problems that converge in a few steps)
  OT_B16=(--quick --no-pot)
  OT_B1=(--quick)
  POOL=(--sizes 4 --batch 2 --kinds feature --penalties pseudo-huber --modes implicit full
        --skip-resnet --budget 0.02)
  TESTS=(-m cuda tests/tasks/app/test_ddn_profiler.py)
  TRAIN=()
  TINY=(trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.limit_val_batches=1
        trainer.limit_test_batches=1 ddn.profile_every_n_steps=1)
  CLS=("${TINY[@]}" model.width=4)
  MATCH=("${TINY[@]}" data.train_size=32 data.val_size=16 data.test_size=16 model.layers=1)
  CLS_SEL=(--pools robust --modes implicit)
  MATCH_SEL=(--modes implicit)
  LIMITS=(120 120 120 120 120 120)
fi

{
  echo "# GPU benchmark session ($DEVICE)"
  echo
  echo "- Command: \`scripts/gpu_bench.sh --device $DEVICE --out $OUT\`"
  echo "- Started: $(date -u +%Y-%m-%dT%H:%M:%SZ); git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if [ "$DEVICE" = cuda ]; then
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  else
    echo "- Dry run on the CPU with tiny sizes: the numbers mean nothing, the files are what a GPU run writes."
  fi
  echo "- $("$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")')"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0 rc status
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out (partial results kept)"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  echo "   $status in $(( $(date +%s) - t0 )) s"
  echo "| $name | $status | $(( $(date +%s) - t0 )) | logs/$name.log |" >> "$SUMMARY"
}

step cuda_tests "${LIMITS[0]}" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step ot_batch16 "${LIMITS[1]}" "$PY" scripts/bench_ot.py --device "$DEVICE" "${OT_B16[@]}" \
  --skip-targets --out "$OUT/ot"
step ot_plot 30 "$PY" scripts/plot_ot.py --csv "$OUT/ot/ot.csv"
step ot_batch1_pot "${LIMITS[2]}" "$PY" scripts/bench_ot.py --device "$DEVICE" "${OT_B1[@]}" \
  --skip-targets --out "$OUT/ot_b1"
step pool_batch "${LIMITS[3]}" "$PY" scripts/bench_pool.py --device "$DEVICE" "${POOL[@]}" \
  --out "$OUT/pool"
step pool_plot 30 "$PY" scripts/plot_pool.py --csv "$OUT/pool/pool.csv"
step sweep_classification "${LIMITS[4]}" "$PY" scripts/sweep.py --task classification \
  --threads 0 "${CLS_SEL[@]}" --out "$OUT/sweep_classification" --runs-dir "$OUT/runs" \
  "${TRAIN[@]}" "${CLS[@]}"
step sweep_matching "${LIMITS[5]}" "$PY" scripts/sweep.py --task matching --threads 0 \
  "${MATCH_SEL[@]}" --out "$OUT/sweep_matching" --runs-dir "$OUT/runs" "${TRAIN[@]}" "${MATCH[@]}"

{
  echo
  echo "Total: $(( $(date +%s) - START )) s."
  for task in classification matching; do
    readme="$OUT/sweep_$task/README.md"
    [ -f "$readme" ] || continue
    echo
    echo "## Sweep: $task"
    echo
    grep '^|' "$readme"
  done
  echo
  echo "Files: \`ot/ot.csv\` + \`ot/*.png\` (batch 16), \`ot_b1/ot.csv\` (500 x 500 with POT),"
  echo "\`pool/pool.csv\` + \`pool/targets.md\`, \`sweep_<task>/\` (CSV, README, PNG), \`runs/\`"
  echo "(each training run, its offline W&B files: \`wandb sync $OUT/runs/*/wandb/offline-run-*\`)."
} >> "$SUMMARY"
echo "wrote $SUMMARY ($(( $(date +%s) - START )) s)"
exit $FAILED
