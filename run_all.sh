#!/usr/bin/env bash
# Run joint training (joint, audio-only, visual-only) and the five methods, then write the report.
#
#   bash run_all.sh                                   # synthetic demo, 1 seed, short schedule (< 10 min on 2 CPU cores)
#   bash run_all.sh --dataset cremad --seeds 0,1,2    # the real comparison, each script with its official settings
#   bash run_all.sh --methods ogm,dgl --seeds 0       # a subset
#   bash run_all.sh --dataset cremad -- --num-workers 8   # everything after -- goes to every script
#
# Options: --dataset D (synthetic|cremad|ks|vggsound), --seeds LIST, --methods LIST (baseline, baseline_audio,
# baseline_visual, ogm, opm, arl, dgl, aug), --jobs N (runs in parallel, default 2 on synthetic, 1 otherwise),
# --data-root DIR (default data), --out DIR (default runs/all; the report goes to runs/report).
set -uo pipefail
cd "$(dirname "$0")"

DATASET=synthetic SEEDS=0 METHODS=baseline,baseline_audio,baseline_visual,ogm,opm,arl,dgl,aug JOBS="" DATA_ROOT=data
OUT=runs/all EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) DATASET=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --methods) METHODS=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --data-root) DATA_ROOT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# the dataset table of common/data.py: its folder under --data-root (one definition for the scripts and this file)
SUB=$(python -c "import sys; from common.data import DATASETS; print(DATASETS.get(sys.argv[1], {}).get('subdir', ''))" \
  "$DATASET") || exit 1
if [ -z "$SUB" ]; then
  echo "run_all.sh: --dataset must be one of $(python -c "from common.data import DATASETS; print(', '.join(DATASETS))"), got $DATASET" >&2
  exit 2
fi
if [ "$DATASET" != synthetic ] && [ ! -d "$DATA_ROOT/$SUB" ]; then
  echo "run_all.sh: $DATA_ROOT/$SUB not found: prepare $DATASET first (README, 'Real datasets'), or pass --data-root" >&2
  exit 1
fi

# The demo: the synthetic preset shortened so that all eight runs fit in 10 minutes on 2 cores.
if [ "$DATASET" = synthetic ] && [ ${#EXTRA[@]} -eq 0 ]; then
  EXTRA=(--epochs 4 --lr-milestones 3)
fi
if [ -z "$JOBS" ]; then [ "$DATASET" = synthetic ] && JOBS=2 || JOBS=1; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}

mkdir -p "$OUT/logs"
rm -f "$OUT/failed.txt"
if [ "$DATASET" = synthetic ]; then  # generate once before runs start in parallel
  python -c "from common.data import ensure_synthetic; ensure_synthetic('$DATA_ROOT/synthetic')" || exit 1
fi

run_one() {  # method seed
  local method=$1 seed=$2 script args=()
  case "$method" in
    baseline_audio) script=baseline.py; args=(--modality audio) ;;
    baseline_visual) script=baseline.py; args=(--modality visual) ;;
    *) script=$method.py ;;
  esac
  if [ ! -f "$script" ]; then
    echo "$method seed=$seed missing:$script" >> "$OUT/failed.txt"; echo "FAILED $method seed $seed ($script not found)"; return
  fi
  local log="$OUT/logs/${method}__${seed}.log" t0=$SECONDS
  if python "$script" --dataset "$DATASET" --data-root "$DATA_ROOT" --seed "$seed" --runs-dir "$OUT/$method" \
      --no-progress "${args[@]}" "${EXTRA[@]}" > "$log" 2>&1; then
    echo "done   $method seed $seed ($((SECONDS - t0)) s): $(grep '^last epoch' "$log")"
  else
    echo "$method seed=$seed log:$log" >> "$OUT/failed.txt"
    echo "FAILED $method seed $seed ($((SECONDS - t0)) s): $(tail -n 1 "$log")"
  fi
}

T0=$SECONDS
echo "run_all: $DATASET, seeds $SEEDS, methods $METHODS, $JOBS in parallel, extra args: ${EXTRA[*]:-none}"
for seed in ${SEEDS//,/ }; do
  for method in ${METHODS//,/ }; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
    run_one "$method" "$seed" &
  done
done
wait
echo "all runs finished in $((SECONDS - T0)) s"
python -m preprocess.report "$OUT" --out "$(dirname "$OUT")/report"
