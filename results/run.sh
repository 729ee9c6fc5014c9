#!/usr/bin/env bash
# Runs the experiments of RESULTS.md; `results/make_results.py` then builds its tables and plots.
#
#   results/run.sh cifar10|mnist|certify|ptb|all    (from the repository root)
#
# Every run writes to runs/results/EXPERIMENT/NAME (metrics.jsonl, train.log,
# checkpoints) and is skipped when it has already finished, so the script can
# be rerun after an interruption. PYTHON (default .venv/bin/python) runs the
# commands; TFDS_DATA_DIR defaults to ../shared/tfds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export TFDS_DATA_DIR=${TFDS_DATA_DIR:-../shared/tfds}
RUNS=runs/results
SEEDS=(0 1 2)

finished() {  # A run is done once its metrics.jsonl holds a summary line.
  [[ -f "$1/metrics.jsonl" ]] && grep -q '"split": "summary"' "$1/metrics.jsonl"
}

train() {  # train WORKDIR CONFIG [--config.X=Y ...]
  local workdir=$1; shift
  if finished "$workdir"; then echo "done: $workdir"; return; fi
  mkdir -p "$workdir"
  echo "run:  $workdir"
  "$PYTHON" train.py --workdir "$workdir" --config "$@" > "$workdir/train.log" 2>&1
  grep '^summary' "$workdir/train.log"
}

# Epochs that give the baseline the wall-clock time MaxUp took: the base
# epochs scaled by the seconds of the seed-0 MaxUp run over the seed-0
# baseline, rounded to a multiple of UNIT epochs.
equal_time_epochs() {  # equal_time_epochs BASELINE_DIR MAXUP_DIR EPOCHS UNIT
  "$PYTHON" - "$@" <<'PY'
import json, sys
def seconds(workdir):
  lines = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")]
  return [l for l in lines if l["split"] == "summary"][-1]["seconds"]
baseline, maxup, epochs, unit = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
print(f"{round(epochs * seconds(maxup) / seconds(baseline) / unit) * unit:g}")
PY
}

# compare EXPERIMENT CONFIG EPOCHS EPOCH_UNIT M [M ...]: for every seed, the
# baseline (m=1) and each M, then the baseline given the wall-clock time of the
# first M (seed 0).
compare() {
  local experiment=$1 config=$2 epochs=$3 unit=$4 maxup=$5
  shift 4
  local dir=$RUNS/$experiment equal seed m
  for seed in "${SEEDS[@]}"; do
    for m in 1 "$@"; do
      train "$dir/m${m}_seed$seed" "$config:$m" --config.seed="$seed"
    done
    equal=$(equal_time_epochs "$dir/m1_seed0" "$dir/m${maxup}_seed0" "$epochs" "$unit")
    train "$dir/m1_equal_time_seed$seed" "$config:1" --config.seed="$seed" \
      --config.num_epochs="$equal"
  done
}

certify() {  # Every 20th MNIST test image (500 images), n0=100, n=10,000, alpha=0.001.
  local dir=$RUNS/mnist_gauss
  for seed in "${SEEDS[@]}"; do
    for m in 1 5; do
      local workdir=$dir/m${m}_seed$seed
      if [[ -f "$workdir/certify/certified_accuracy_sigma0.5.tsv" ]]; then
        echo "done: $workdir/certify"; continue
      fi
      echo "certify: $workdir"
      "$PYTHON" certify.py --workdir "$workdir" --n0 100 --n 10000 --skip 20 \
        > "$workdir/certify.log" 2>&1
    done
  done
}

cifar10() { compare cifar10 configs/results_cifar10.py 30 1 4 2 10; }
mnist() { compare mnist_gauss configs/results_mnist_gauss.py 2 0.5 5; }
ptb() { compare ptb configs/results_ptb.py 6 1 2; }

case "${1:-}" in
  cifar10|mnist|certify|ptb) "$1" ;;
  all) cifar10; mnist; certify; ptb ;;
  *) echo "usage: $0 cifar10|mnist|certify|ptb|all" >&2; exit 2 ;;
esac
