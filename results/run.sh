#!/usr/bin/env bash
# Runs the experiments of RESULTS.md; `results/make_results.py` then builds its tables and plots.
#
#   results/run.sh cifar10|mnist|certify|ptb|all    (from the repository root)
#   results/run.sh cifar10_certify|cifar10_certify_sigma05|ptb_asgd|ptb_asgd_more_seeds
#   results/run.sh scratch|scratch_more_seeds|finetune|finetune_cutmix|scratch_ablation
#
# How to rerun, each target's budget and what is still to run: results/README.md.
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
SEEDS=(${SEEDS:-0 1 2})  # SEEDS="1 2" results/run.sh ... runs those seeds only

finished() {  # A run is done once its last summary line is not that of a preempted run.
  [[ -f "$1/metrics.jsonl" ]] &&
    grep '"split": "summary"' "$1/metrics.jsonl" | tail -n 1 | grep -qv '"preempted": true'
}

# A fresh checkout has no runs/: the logs that `make_results.py --collect`
# kept in results/logs stand in for their runs, so finished runs are skipped
# and the grid choices and step-time measurements in them are reused, not redone.
# Files already under runs/ are left as they are; to run a collected run
# again, remove it from both places.
restore_collected() {
  local source target
  while IFS= read -r source; do
    target=$RUNS/${source#results/logs/}
    [[ -e $target ]] && continue
    mkdir -p "$(dirname "$target")"
    cp "$source" "$target"
  done < <(find results/logs -type f -not -path 'results/logs/attempts/*')
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

# Certifies a trained run's smoothed classifier at the noise level it was
# trained with on every SKIP-th test image: n0=100, n=10,000, alpha=0.001.
# An interrupted certification continues from its last certified image.
certify_run() {  # certify_run WORKDIR SIGMA SKIP
  local workdir=$1 sigma=$2 skip=$3
  if [[ -f "$workdir/certify/certified_accuracy_sigma$sigma.tsv" ]]; then
    echo "done: $workdir/certify"; return
  fi
  echo "certify: $workdir"
  "$PYTHON" certify.py --workdir "$workdir" --n0 100 --n 10000 --alpha 0.001 --skip "$skip" \
    >> "$workdir/certify.log" 2>&1
  grep -A 2 '^Certified accuracy' "$workdir/certify.log" | tail -n 3
}

certify() {  # Experiment 3: every 20th MNIST test image (500 images).
  local seed m
  for seed in "${SEEDS[@]}"; do
    for m in 1 5; do
      certify_run "$RUNS/mnist_gauss/m${m}_seed$seed" 0.5 20
    done
  done
}

# Experiment 8: Gaussian augmentation vs MaxUp+Gauss (m=5) on CIFAR-10 at
# sigma 0.25, each run certified on every 50th test image (200 images).
cifar10_certify() {
  local dir=$RUNS/cifar10_gauss config=results/configs/cifar10_gauss.py seed m
  for seed in "${SEEDS[@]}"; do
    for m in 1 5; do
      train "$dir/m${m}_seed$seed" "$config:$m" --config.seed="$seed"
      certify_run "$dir/m${m}_seed$seed" 0.25 50
    done
  done
}

# The baseline epochs that cost a MaxUp run's time, from step times measured
# side by side (results/equal_time.py); measured once per experiment and kept
# in its directory, so every seed gets the same number.
measured_equal_time() {  # measured_equal_time DIR CONFIG:ARG UNIT
  mkdir -p "$1"
  "$PYTHON" -m results.equal_time --config "$2" --unit "$3" --out "$1/equal_time.json"
}

# Per seed: the baseline (m=1), MaxUp with MAXUP copies, and the baseline
# given MaxUp's time (its epochs from measured_equal_time). CONFIG_PREFIX is
# the config argument up to M: "results/configs/NAME.py:" or "results/configs/NAME.py:ARG,".
measured_compare() {  # measured_compare DIR CONFIG_PREFIX MAXUP UNIT
  local dir=$1 config=$2 maxup=$3 unit=$4 equal seed m
  equal=$(measured_equal_time "$dir" "$config$maxup" "$unit")
  for seed in "${SEEDS[@]}"; do
    for m in 1 "$maxup"; do
      train "$dir/m${m}_seed$seed" "$config$m" --config.seed="$seed"
    done
    train "$dir/m1_equal_time_seed$seed" "${config}1" --config.seed="$seed" \
      --config.num_epochs="$equal"
  done
}

# Experiment 6: from scratch until the baseline fits its 2,500 images.
scratch() { measured_compare "$RUNS/cifar10_scratch" results/configs/cifar10_scratch.py: 4 1; }

# Experiment 6, seeds 3 and 4 of the two methods whose difference three seeds
# left within noise.
scratch_more_seeds() {
  local dir=$RUNS/cifar10_scratch config=results/configs/cifar10_scratch.py seed m
  for seed in 3 4; do
    for m in 1 4; do
      train "$dir/m${m}_seed$seed" "$config:$m" --config.seed="$seed"
    done
  done
}

scratch_ablation() {  # m = 2 and 10 in experiment 6's regime.
  local dir=$RUNS/cifar10_scratch config=results/configs/cifar10_scratch.py seed m
  for seed in "${SEEDS[@]}"; do
    for m in 2 10; do
      train "$dir/m${m}_seed$seed" "$config:$m" --config.seed="$seed"
    done
  done
}

# Experiment 7: fine-tune experiment 6's seed-0 baseline, Cutout and CutMix.
finetune() {
  local config=results/configs/cifar10_finetune.py aug
  local pretrained=$RUNS/cifar10_scratch/m1_seed0
  # The starting point is its checkpoint; restore_collected brings back only
  # its logs, so a fresh checkout trains it again (~15 min alone).
  if [[ ! -d $pretrained/checkpoints ]]; then
    rm -rf "$pretrained"
    train "$pretrained" results/configs/cifar10_scratch.py:1 --config.seed=0
  fi
  for aug in cutout cutmix; do
    measured_compare "$RUNS/cifar10_finetune_$aug" "$config:$aug," 4 0.5
  done
}

# Experiment 8 at sigma 0.5 (the issue's next priority after experiment 10):
# the same two methods, trained and certified at sigma 0.5, into their own
# directory.
cifar10_certify_sigma05() {
  local dir=$RUNS/cifar10_gauss_sigma0.5 config=results/configs/cifar10_gauss.py seed m
  for seed in "${SEEDS[@]}"; do
    for m in 1 5; do
      train "$dir/m${m}_seed$seed" "$config:$m" --config.seed="$seed" \
        --config.augment.gaussian_sigma=0.5
      certify_run "$dir/m${m}_seed$seed" 0.5 50
    done
  done
}

# A fine-tune's starting point is a run's checkpoint; restore_collected
# brings back only its logs, so without checkpoints the run trains again.
pretrained() {  # pretrained WORKDIR CONFIG [--config.X=Y ...]
  local workdir=$1; shift
  if [[ ! -d $workdir/checkpoints ]]; then
    rm -rf "$workdir"
  fi
  train "$workdir" "$@"
}

# Experiment 10: the paper's fine-tuning recipe at CIFAR scale. Per seed:
# the CutMix-trained baseline (experiment 6's regime with CutMix for Cutout);
# from it, at each learning rate (the paper's 1e-5 first), MaxUp+CutMix
# (m=4), CutMix (m=1) and CutMix for MaxUp's time, 20 epochs; then the
# BatchNorm-frozen variant (the paper's EfficientNet recipe: 1e-4, 5 epochs).
# Fine-tuning seed S starts from pretrained seed S. LRS="1e-5" runs a subset.
finetune_cutmix() {
  local config=results/configs/cifar10_finetune_cutmix.py seed lr m equal init
  local scratch=$RUNS/cifar10_cutmix_scratch dir=$RUNS/cifar10_finetune_paper
  local frozen=$RUNS/cifar10_finetune_paper_frozen
  for seed in "${SEEDS[@]}"; do
    pretrained "$scratch/m1_seed$seed" "$config:pretrain" --config.seed="$seed"
  done
  equal=$(measured_equal_time "$dir" "$config:1e-5,4" 1)
  for lr in ${LRS:-1e-5 1e-4 1e-3}; do
    for seed in "${SEEDS[@]}"; do
      init=--config.init_checkpoint=$scratch/m1_seed$seed
      for m in 4 1; do
        train "$dir/lr${lr}_m${m}_seed$seed" "$config:$lr,$m" --config.seed="$seed" "$init"
      done
      train "$dir/lr${lr}_m1_equal_time_seed$seed" "$config:$lr,1" --config.seed="$seed" "$init" \
        --config.num_epochs="$equal"
    done
  done
  # The step-time ratio is measured on the frozen variant's own steps (BatchNorm frozen).
  equal=$(measured_equal_time "$frozen" "$config:1e-4,4,frozen" 0.5)
  for seed in "${SEEDS[@]}"; do
    init=--config.init_checkpoint=$scratch/m1_seed$seed
    for m in 4 1; do
      train "$frozen/lr1e-4_m${m}_seed$seed" "$config:1e-4,$m,frozen" --config.seed="$seed" "$init"
    done
    train "$frozen/lr1e-4_m1_equal_time_seed$seed" "$config:1e-4,1,frozen" --config.seed="$seed" \
      "$init" --config.num_epochs="$equal"
  done
}

# Experiment 9: PTB past NT-ASGD's switch. First the baseline's dropout, a
# grid at seed 0 without the fine-tuning restart or dynamic evaluation; the
# lowest validation perplexity of the best weights picks the dropout of
# every later run.
ptb_asgd_dropout() {
  local dir=$RUNS/ptb_asgd_dropout config=results/configs/ptb_asgd.py dropout
  for dropout in 0.1 0.3 0.5; do
    train "$dir/dropout${dropout}_seed0" "$config:$dropout,1" --config.seed=0 \
      --config.finetune.num_restarts=0 --config.dynamic_eval.enabled=False
  done
}

# The dropout of the grid run with the best validation perplexity among those
# NT-ASGD switched to ASGD (the experiment is about the regime after it).
best_dropout() {  # best_dropout GRID_DIR
  "$PYTHON" - "$1" <<'PY'
import json, pathlib, sys
def records(run):
  return [json.loads(line) for line in open(run / "metrics.jsonl")]
def valid_perplexity(run):
  return [r for r in records(run) if r["split"] == "summary"][-1]["valid_perplexity"]
runs = sorted(pathlib.Path(sys.argv[1]).glob("dropout*_seed0"))
switched = [run for run in runs if any(r.get("switched_to_asgd") for r in records(run))]
if not switched:
  sys.exit(f"no grid run in {sys.argv[1]} switched to ASGD: raise num_epochs in the config")
print(json.loads((min(switched, key=valid_perplexity) / "config.json").read_text())["model"]["input_dropout"])
PY
}

ptb_asgd() {
  local dropout
  ptb_asgd_dropout
  dropout=$(best_dropout "$RUNS/ptb_asgd_dropout")
  echo "dropout: $dropout"
  measured_compare "$RUNS/ptb_asgd" "results/configs/ptb_asgd.py:$dropout," 2 1
}

# Experiment 9, seeds 3 and 4 of the baseline and MaxUp (the treatment
# experiment 6 had): three seeds left the paired difference short of p < 0.05.
ptb_asgd_more_seeds() {
  local dropout dir=$RUNS/ptb_asgd config=results/configs/ptb_asgd.py seed m
  dropout=$(best_dropout "$RUNS/ptb_asgd_dropout")
  for seed in 3 4; do
    for m in 1 2; do
      train "$dir/m${m}_seed$seed" "$config:$dropout,$m" --config.seed="$seed"
    done
  done
}

cifar10() { compare cifar10 results/configs/cifar10.py 30 1 4 2 10; }
mnist() { compare mnist_gauss results/configs/mnist_gauss.py 2 0.5 5; }
ptb() { compare ptb results/configs/ptb.py 6 1 2; }

case "${1:-}" in
  cifar10|mnist|certify|ptb|scratch|scratch_more_seeds|finetune|finetune_cutmix|scratch_ablation|cifar10_certify|cifar10_certify_sigma05|ptb_asgd|ptb_asgd_more_seeds)
    restore_collected; "$1" ;;
  all) restore_collected
       cifar10; mnist; certify; ptb; scratch; scratch_more_seeds; finetune; scratch_ablation
       cifar10_certify; ptb_asgd; ptb_asgd_more_seeds; finetune_cutmix; cifar10_certify_sigma05 ;;
  *) echo "usage: $0 cifar10|mnist|certify|ptb|scratch|scratch_more_seeds|finetune|finetune_cutmix|scratch_ablation|cifar10_certify|cifar10_certify_sigma05|ptb_asgd|ptb_asgd_more_seeds|all" >&2
     exit 2 ;;
esac
