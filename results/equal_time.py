"""Epochs that give the baseline (m=1) the training time of a MaxUp config.

  python results/equal_time.py --config configs/results_cifar10_scratch.py:4 --out FILE.json
  python results/equal_time.py --config configs/results_ptb.py:2

Times the config's training step (image or language model) at m=1 and at its
m in interleaved rounds in one process (so load from other processes hits
both alike), and prints

  equal-time epochs = warm-up + (epochs - warm-up) * t_MaxUp / t_baseline,

rounded to a multiple of --unit: MaxUp runs its first `maxup.warmup_epochs`
(language models: none) at the baseline's cost. A ratio of step times
measured side by side is steadier than a ratio of two runs' wall times on a
shared machine; evaluation, the same for both, is left out. A language-model
step is timed on random tokens over the corpus's published vocabulary, at
the config's batch size and full `bptt` segment length. With --out, the
measurement is written there and reused when the file exists.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import common  # noqa: E402  (puts the repository on the import path)
import numpy as np  # noqa: E402

from trainer import text_data  # noqa: E402


def load_config(spec: str):
  """`configs/NAME.py:ARG` -> that file's get_config(ARG)."""
  path, _, arg = spec.partition(":")
  module = importlib.import_module("configs." + os.path.splitext(os.path.basename(path))[0])
  return module.get_config(arg) if arg else module.get_config()


def equal_time_epochs(config, ratio: float, unit: float) -> float:
  """The baseline epochs that cost what `config`'s MaxUp run costs."""
  warmup = min(config.maxup.get("warmup_epochs", 0), config.num_epochs)
  epochs = warmup + (config.num_epochs - warmup) * ratio
  return round(epochs / unit) * unit


def step_runners(config) -> dict:
  """A runner of the config's training step at m=1 and at its m."""
  num_copies = config.maxup.num_copies
  if config.get("task", "image") == "language":
    vocab_size = text_data.PUBLISHED_COUNTS[config.dataset].vocab
    streams = np.random.default_rng(0).integers(
        0, vocab_size, (config.batch_size, config.bptt + 1), dtype=np.int32)
    padded = text_data.padded_length(config.bptt, config.seq_len_bucket)
    batch = text_data.segment(streams, 0, config.bptt, padded)
    return {m: common.LanguageStepRunner(config, vocab_size, batch, config.bptt, m)
            for m in (1, num_copies)}
  steps = common.Steps(config.model, config.batch_size, dtype=config.dtype, config=config)
  batch = steps.batch()
  return {m: common.StepRunner(steps, steps.train_step(m), batch) for m in (1, num_copies)}


def measure(config, repeats: int) -> dict:
  """Seconds per step at m=1 and at the config's m, interleaved; their medians' ratio."""
  num_copies = config.maxup.num_copies
  times = common.interleaved_medians(step_runners(config), repeats, warmup=2)
  baseline, maxup = common.median(times[1]), common.median(times[num_copies])
  return {"num_copies": num_copies, "baseline_step_s": baseline, "maxup_step_s": maxup,
          "ratio": maxup / baseline, "repeats": repeats, **common.environment()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py:ARG of the MaxUp run")
  parser.add_argument("--unit", type=float, default=1.0, help="round to a multiple of this")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--out", default="", help="JSON file to write, or to reuse if present")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  if config.maxup.num_copies < 2:
    raise SystemExit(f"{args.config} has maxup.num_copies={config.maxup.num_copies}; "
                     "give the MaxUp config (m >= 2)")
  if args.out and os.path.exists(args.out):
    with open(args.out) as f:
      measured = json.load(f)
  else:
    measured = measure(config, args.repeats)
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(measured, f, indent=2)
  print(f"{equal_time_epochs(config, measured['ratio'], args.unit):g}")


if __name__ == "__main__":
  main()
