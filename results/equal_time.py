"""Epochs that give the baseline (m=1) the training time of a MaxUp config.

  python -m results.equal_time --config results/configs/cifar10_scratch.py:4 --out FILE.json
  python -m results.equal_time --config results/configs/ptb.py:2

Times the config's training step (image or language model, as
`trainer.image.build_steps` / `trainer.language.build_steps` build it for
train.py) at m=1 and at its m in interleaved rounds in one process
(`trainer.timing`: load from other processes hits both alike), and prints

  equal-time epochs = warm-up + (epochs - warm-up) * t_MaxUp / t_baseline,

rounded to a multiple of --unit: MaxUp runs its first `maxup.warmup_epochs`
(language models: none) at the baseline's cost. A ratio of step times
measured side by side is steadier than a ratio of two runs' wall times on a
shared machine; evaluation, the same for both, is left out. Steps run on one
device. An image step is timed on random images of the dataset's published
shape; a language-model step on random tokens over the corpus's published
vocabulary, at the config's batch size and full `bptt` segment length. With
--out, the measurement is written there and reused when the file exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

from trainer import xla_cpu

# train.py's XLA:CPU defaults, so that the steps timed are the steps the runs train with.
xla_cpu.apply_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from trainer import core, image, image_data, language, text_data, timing  # noqa: E402


def load_config(spec: str):
  """`PATH.py:ARG` (as train.py's --config takes it) -> that file's get_config(ARG)."""
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  if module_spec is None:
    raise SystemExit(f"--config {spec}: no Python file at {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def equal_time_epochs(config, ratio: float, unit: float) -> float:
  """The baseline epochs that cost what `config`'s MaxUp run costs."""
  warmup = min(config.maxup.get("warmup_epochs", 0), config.num_epochs)
  epochs = warmup + (config.num_epochs - warmup) * ratio
  return round(epochs / unit) * unit


def step_runners(config) -> dict[int, timing.StepRunner]:
  """The config's training step at m=1 and at its m, each on a fresh state of its own."""
  num_copies = config.maxup.num_copies
  mesh = core.create_mesh(1)
  rng = np.random.default_rng(0)
  if config.task == "language":
    vocab_size = text_data.PUBLISHED_COUNTS[config.dataset].vocab
    steps = language.build_steps(config, mesh, vocab_size)
    streams = rng.integers(0, vocab_size, (config.batch_size, config.bptt + 1), dtype=np.int32)
    padded = text_data.padded_length(config.bptt, config.seq_len_bucket)
    batch = text_data.segment(streams, 0, config.bptt, padded)
    inputs = (jax.device_put(batch, steps.data_sharding), jnp.int32(config.bptt))
  else:
    facts = image_data.published_dataset_facts(config.dataset, config.num_train_examples,
                                               config.num_eval_examples)
    steps = image.build_steps(config, mesh, facts)
    abstract = steps.abstract_batch(config.batch_size)
    batch = {"image": rng.integers(0, 256, abstract["image"].shape, dtype=np.uint8),
             "label": rng.integers(0, facts.num_classes, abstract["label"].shape,
                                   dtype=np.int32)}
    inputs = (jax.device_put(batch, steps.data_sharding),)
  return {m: timing.StepRunner(steps.train_steps[m], steps.init_state(), inputs,
                               steps.train_key)
          for m in (1, num_copies)}


def measure(config, repeats: int) -> dict:
  """Seconds per step at m=1 and at the config's m, interleaved; their medians' ratio."""
  num_copies = config.maxup.num_copies
  times = timing.interleaved_medians(step_runners(config), repeats, warmup=2)
  baseline, maxup = timing.median(times[1]), timing.median(times[num_copies])
  return {"num_copies": num_copies, "baseline_step_s": baseline, "maxup_step_s": maxup,
          "ratio": maxup / baseline, "repeats": repeats, **timing.environment()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="PATH.py:ARG of the MaxUp run")
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
