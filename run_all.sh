#!/usr/bin/env bash
# Run joint training (joint, audio-only, visual-only) and the seven methods, then write the report.
#
#   bash run_all.sh --quick                           # joint training and the visual encoder alone: the imbalance (~1 min)
#   bash run_all.sh                                   # the demo: synthetic audio-dominant regime, 3 seeds (< 10 min, 2 CPUs)
#   bash run_all.sh --study regimes                   # the regime study: 4 regimes x 11 runs x 3 seeds (over 1 h)
#   bash run_all.sh --dataset cremad --seeds 0,1,2    # the real comparison, each script with its official settings
#   bash run_all.sh --methods ogm,dgl --seeds 0       # a subset
#   bash run_all.sh --dataset cremad -- --num-workers 8   # everything after -- goes to every script
#
# Options: --dataset D (synthetic|cremad|ks|vggsound), --seeds LIST (default 0,1,2 on synthetic, else 0), --methods
# LIST (baseline, baseline_audio, baseline_visual, ogm, opm, arl, dgl, aug, aug_trained = aug --train-new-heads, mmpareto, inforeg),
# --regime R (synthetic: a named regime of common/synthetic.py written to DATA_ROOT/regimes/R; default
# audio-dominant; none = DATA_ROOT/synthetic as it is), --study regimes, --jobs N (runs in parallel, default 2 on
# synthetic, 1 otherwise), --data-root DIR (default data), --out DIR (default runs/all, the study runs/study; the
# report goes to runs/report, the study's to runs/study/report), --checkpoints (keep each run's last.pt, 179 MB a run;
# by default the runs write none: --no-save), --quick (the demo's first two methods, baseline and baseline_visual,
# seed 0, into runs/quick: the imbalance the methods address, in about a minute).
set -uo pipefail
cd "$(dirname "$0")"

DATASET=synthetic SEEDS="" METHODS="" JOBS="" DATA_ROOT=data OUT="" EXTRA=() REGIME=audio-dominant STUDY="" SAVE=(--no-save)
QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) DATASET=$2; shift 2 ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --methods) METHODS=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --data-root) DATA_ROOT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --regime) REGIME=$2; shift 2 ;;
    --study) STUDY=$2; shift 2 ;;
    --checkpoints) SAVE=(); shift ;;
    --quick) QUICK=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n 2,18p "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$STUDY" ] && [ "$STUDY" != regimes ]; then
  echo "run_all.sh: --study must be regimes, got $STUDY" >&2; exit 2
fi
if [ -n "$STUDY" ] && [ "$DATASET" != synthetic ]; then
  echo "run_all.sh: --study regimes runs on the synthetic regimes; drop --dataset $DATASET" >&2; exit 2
fi
if [ "$DATASET" = synthetic ] && [ "$REGIME" != none ]; then
  python -c "import sys; from common.synthetic import regime_args; regime_args(sys.argv[1])" "$REGIME" 2>/dev/null || {
    echo "run_all.sh: --regime must be none or one of $(python -c "from common.synthetic import REGIMES; print(', '.join(REGIMES))"), got $REGIME" >&2
    exit 2; }
fi

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

# The demo: 4 epochs (LR x0.1 for the last), a 0.5 s audio window and 24-px frames, so that its 27 runs fit in 10
# minutes on 2 cores. The study: the same inputs for 8 epochs (LR x0.1 for the last), so that OGM's modulation
# window (epochs 0-5 of the synthetic preset) closes within the run; 132 runs.
# docs/results.md says what these numbers can and cannot show.
if [ "$DATASET" = synthetic ] && [ ${#EXTRA[@]} -eq 0 ]; then
  if [ -n "$STUDY" ]; then EXTRA=(--epochs 8 --lr-milestones 7 --audio-seconds 0.5 --frame-size 24)
  else EXTRA=(--epochs 4 --lr-milestones 3 --audio-seconds 0.5 --frame-size 24); fi
fi
if [ -n "$QUICK" ]; then
  [ -n "$STUDY" ] && { echo "run_all.sh: --quick runs the demo's first two methods; drop --study" >&2; exit 2; }
  [ "$DATASET" != synthetic ] && { echo "run_all.sh: --quick runs on the synthetic set; drop --dataset" >&2; exit 2; }
  [ -z "$METHODS" ] && METHODS=baseline,baseline_visual
  [ -z "$SEEDS" ] && SEEDS=0
  [ -z "$OUT" ] && OUT=runs/quick
fi
if [ -z "$JOBS" ]; then [ "$DATASET" = synthetic ] && JOBS=2 || JOBS=1; fi
if [ -z "$SEEDS" ]; then [ "$DATASET" = synthetic ] && SEEDS=0,1,2 || SEEDS=0; fi
if [ -z "$METHODS" ]; then
  if [ -n "$STUDY" ]; then METHODS=baseline,baseline_audio,baseline_visual,ogm,opm,arl,dgl,aug,aug_trained,mmpareto,inforeg
  elif [ "$DATASET" = synthetic ] && [ "$REGIME" != none ]; then METHODS=baseline,baseline_visual,ogm,opm,arl,dgl,aug,mmpareto,inforeg
  else METHODS=baseline,baseline_audio,baseline_visual,ogm,opm,arl,dgl,aug,mmpareto,inforeg; fi
fi
[ -z "$OUT" ] && { [ -n "$STUDY" ] && OUT=runs/study || OUT=runs/all; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}

prepare_regime() {  # regime -> the data root holding its synthetic/ (written once, regenerated if it differs)
  local root="$DATA_ROOT/regimes/$1"
  python -c "import sys; from common.synthetic import ensure_synthetic, regime_args
ensure_synthetic(sys.argv[1] + '/synthetic', regime_args(sys.argv[2]))" "$root" "$1" >&2 || return 1
  echo "$root"
}

run_one() {  # method seed data_root out
  local method=$1 seed=$2 root=$3 out=$4 script args=()
  case "$method" in
    baseline_audio) script=baseline.py; args=(--modality audio) ;;
    baseline_visual) script=baseline.py; args=(--modality visual) ;;
    aug_trained) script=aug.py; args=(--train-new-heads --exp-name aug_trained) ;;
    *) script=$method.py ;;
  esac
  if [ ! -f "$script" ]; then
    echo "$method seed=$seed missing:$script" >> "$out/failed.txt"; echo "FAILED $method seed $seed ($script not found)"; return
  fi
  local log="$out/logs/${method}__${seed}.log" t0=$SECONDS
  if python "$script" --dataset "$DATASET" --data-root "$root" --seed "$seed" --runs-dir "$out/$method" \
      --no-progress "${SAVE[@]}" "${args[@]}" "${EXTRA[@]}" > "$log" 2>&1; then
    echo "done   $method seed $seed ($((SECONDS - t0)) s): $(grep '^last epoch' "$log")"
  else
    echo "$method seed=$seed log:$log" >> "$out/failed.txt"
    echo "FAILED $method seed $seed ($((SECONDS - t0)) s): $(tail -n 1 "$log")"
  fi
}

run_set() {  # data_root out: every method x seed, JOBS at a time
  local root=$1 out=$2
  mkdir -p "$out/logs"
  rm -f "$out/failed.txt"
  for seed in ${SEEDS//,/ }; do
    for method in ${METHODS//,/ }; do
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
      run_one "$method" "$seed" "$root" "$out" &
    done
  done
  wait
}

T0=$SECONDS
echo "run_all: $DATASET${STUDY:+ (study: $STUDY)}, seeds $SEEDS, methods $METHODS, $JOBS in parallel," \
  "extra args: ${EXTRA[*]:-none}"
if [ -n "$STUDY" ]; then
  for regime in $(python -c "from tools.report import STUDY_REGIMES; print(' '.join(STUDY_REGIMES))"); do
    echo "regime $regime"
    root=$(prepare_regime "$regime") || exit 1
    run_set "$root" "$OUT/$regime"
  done
  echo "all runs finished in $((SECONDS - T0)) s"
  for regime in $(python -c "from tools.report import STUDY_REGIMES; print(' '.join(STUDY_REGIMES))"); do
    python -m tools.report "$OUT/$regime" --out "$OUT/report/$regime" > /dev/null
  done
  python -m tools.report --study "$OUT" --out "$OUT/report"
else
  if [ "$DATASET" = synthetic ]; then  # generate once before runs start in parallel
    if [ "$REGIME" = none ]; then
      python -c "from common.synthetic import ensure_synthetic; ensure_synthetic('$DATA_ROOT/synthetic')" || exit 1
      root=$DATA_ROOT
    else
      root=$(prepare_regime "$REGIME") || exit 1
    fi
  else
    root=$DATA_ROOT
  fi
  run_set "$root" "$OUT"
  echo "all runs finished in $((SECONDS - T0)) s"
  if [ -n "$QUICK" ]; then python -m tools.report "$OUT" --out "$OUT/report"
  else python -m tools.report "$OUT" --out "$(dirname "$OUT")/report"; fi
fi
