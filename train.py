"""Trains a model with MaxUp as a config says.

  python train.py --config configs/cifar10_resnet20.py --workdir runs/r20
  python train.py --config configs/cifar_paper.py:cifar100,wrn28_10,maxup --workdir runs/wrn

Any config field can be overridden, e.g. `--config.maxup.num_copies=10`.
Running the same command again resumes from the newest checkpoint in --workdir.
On a TPU pod or a SLURM cluster every process runs this same command with
--multihost (or with the explicit --coordinator_address/--num_processes/--process_id).
"""

import importlib.util
import sys

# The library alone (`pip install maxup-jax`) does not bring the training stack.
_MISSING = [module for module in ("absl", "ml_collections", "tensorflow_datasets", "array_record",
                                  "grain", "PIL", "orbax", "etils", "tensorboardX", "matplotlib",
                                  "tqdm") if importlib.util.find_spec(module) is None]
if _MISSING:
  sys.exit(f"train.py needs the training stack, which is not installed (missing: "
           f"{', '.join(_MISSING)}). Install it with: pip install \"maxup-jax[train]\" "
           "(in a checkout, ./make_venv.sh installs it into .venv).")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import trainer
from trainer import xla_cpu

WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
CONFIG = config_flags.DEFINE_config_file("config", None, "A file under configs/.", lock_config=True)
MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
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


def _fmt(value):
  return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
  app.run(main)
