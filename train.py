"""Trains a model with MaxUp as a config says.

  python train.py --config configs/cifar10_resnet20.py --workdir runs/r20
  python train.py --config configs/cifar_paper.py:cifar100,wrn28_10,maxup --workdir runs/wrn

Any config field can be overridden, e.g. `--config.maxup.num_copies=10`.
Running the same command again resumes from the newest checkpoint in --workdir.

Before renting a TPU slice, compile the run's steps for it on any machine
(needs `pip install "maxup-jax[tpu]"`; no data, no weights, no --workdir):

  python train.py --config configs/hardware.py:tpu_v4_32:cifar_paper:cifar100,wrn28_10,maxup --compile_only

prints per chip: memory against the chip's HBM (and what would make a step
fit), FLOPs, collectives, and estimated step time and chip-hours
(`trainer/compile_report.py`).
On a TPU pod or a SLURM cluster every process runs this same command with
--multihost (or with the explicit --coordinator_address/--num_processes/--process_id).
"""

import sys

from trainer.stack import require_training_stack

require_training_stack("train.py")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import trainer
from trainer import xla_cpu

WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "A config file, optionally with :ARG: configs/, or results/configs/ for RESULTS.md's "
    "experiments.", lock_config=True)
MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the config's steps for its TPU preset's slice on this "
    "machine (needs libtpu) and print memory, FLOPs and estimated cost; trains nothing.")
JSON_OUT = flags.DEFINE_string("json_out", None, "With --compile_only: also write the report here.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if COMPILE_ONLY.value:
    return compile_only()
  if WORKDIR.value is None:
    raise app.UsageError("--workdir is required (unless --compile_only)")
  xla_cpu.apply_defaults()  # Before the first computation starts JAX's backend.
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log every checkpoint step at INFO; the run reports through
    # its progress bar and metrics files instead.
    logging.set_verbosity(logging.WARNING)
  if COORDINATOR.value is not None:
    jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  elif MULTIHOST.value:
    jax.distributed.initialize()
  summary = trainer.run(CONFIG.value, WORKDIR.value)
  if jax.process_index() == 0:
    print("summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items()), flush=True)


def compile_only():
  from trainer import compile_report  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config_arg = flags.FLAGS["config"].serialize().partition("=")[2]
  try:
    report = compile_report.compile_config(CONFIG.value, config_arg)
  except (compile_report.LibtpuMissing, ValueError) as e:
    sys.exit(f"train.py --compile_only: {e}")
  print(report.format(), flush=True)
  if JSON_OUT.value:
    import json  # pylint: disable=g-import-not-at-top
    with open(JSON_OUT.value, "w") as f:
      json.dump(report.asdict(), f, indent=1)


def _fmt(value):
  return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
  app.run(main)
