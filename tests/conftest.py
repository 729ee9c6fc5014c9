"""Test-wide setup, and the paths, configs and helpers several test files share.

Four simulated CPU devices, so multi-device code runs on any machine. The
tests run XLA:CPU without LLVM optimisation (TEST_XLA_FLAGS below) and
without train.py's default flags
(`trainer/xla_cpu.py`, tested on its own in test_xla_cpu.py): with XLA's
Eigen convolutions, the resume tests, which compare this 4-device process
with 1-device train.py subprocesses to 1e-6, saw parameters differ by up to
6e-5 after 8 steps (and agree without them).

Test files import the shared pieces with `from conftest import ...` (pytest
puts tests/ on sys.path).
"""

import atexit
import os
import shutil
import tempfile

# XLA:CPU's LLVM optimisation is most of every compilation, and the tests'
# programs run for milliseconds: without it a tiny training run takes a third
# less time (its train step compiles in 3 s instead of 8). Every process of
# the session compiles this way (xdist's workers inherit the environment;
# train_py.run passes the flag to train.py), so runs that tests compare with
# each other round alike; what XLA optimises is XLA's to test, the programs'
# semantics, FLOPs and memory are ours, and XLA fixes the last two before
# LLVM runs (the partitioning tests' CutMix, Gaussian and ResNet-8 steps
# report the same FLOPs and temporary bytes with and without the flag).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"

# Must happen before JAX initialises its backends; single-device code keeps
# using device 0, so this costs the other tests nothing.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
if TEST_XLA_FLAGS not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + TEST_XLA_FLAGS
# Inherited by every train.py / benchmark subprocess the tests start.
os.environ["MAXUP_JAX_XLA_DEFAULTS"] = "0"

# One JAX compilation cache for the whole session: the pytest processes
# (xdist's workers inherit the controller's environment) and the train.py and
# benchmark subprocesses they start. The programs of the tiny runs recur in
# many tests (ResNet-8's initialisation alone compiles for longer than its
# eight training steps run); after the first compilation each loads from
# disk, the same executable either way.
if "MAXUP_JAX_TEST_COMPILATION_CACHE" not in os.environ:
  os.environ["MAXUP_JAX_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="maxup_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["MAXUP_JAX_TEST_COMPILATION_CACHE"],
                  ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["MAXUP_JAX_TEST_COMPILATION_CACHE"]

# Only imports below the environment settings: they must precede JAX's start.
from pathlib import Path  # noqa: E402

import flax  # noqa: E402
import pytest  # noqa: E402

from configs import cifar10_resnet20  # noqa: E402
from trainer import metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The real data sets, prepared beside the checkout: tfds builds (cifar10,
# mnist) and plain-text corpora (ptb/, tiny_shakespeare.txt).
DATA_DIR = REPO.parent / "shared" / "tfds"
TEXT_DIR = REPO.parent / "shared" / "text"
PTB_DIR = TEXT_DIR / "ptb"


def needs_data(*datasets):
  """A mark that skips a test unless each tfds dataset is prepared in DATA_DIR."""
  missing = [name for name in datasets if not (DATA_DIR / name).is_dir()]
  return pytest.mark.skipif(bool(missing), reason=f"real {', '.join(missing)} not found in "
                            f"{DATA_DIR}")


needs_cifar10 = needs_data("cifar10")
needs_ptb = pytest.mark.skipif(not PTB_DIR.is_dir(), reason=f"PTB not found in {PTB_DIR}")


# ---------------------------------------------------------------------------
# Tiny image runs on the real data.


def shrink(config, **overrides):
  """An image `config` on DATA_DIR's real data, shrunk to seconds a run; returns `config`.

  256 training images in batches of 64 (4 steps an epoch), 200 test images
  scored in batches of 100; then `overrides`, dotted names included
  (`**{"maxup.warmup_epochs": 0}`).
  """
  config.update_from_flattened_dict({
      "data_dir": str(DATA_DIR), "num_train_examples": 256, "num_eval_examples": 200,
      "batch_size": 64, "eval_batch_size": 100, **overrides})
  return config


def tiny_cifar_config(**overrides):
  """The quick-start configs/cifar10_resnet20.py shrunk to 8 steps of ResNet-8.

  2 epochs of 4 steps, MaxUp (m=4) throughout, so that a run compiles one
  train step (test_recompilation.py runs the warm-up epochs); every step
  logged, a checkpoint every 2.
  """
  return shrink(cifar10_resnet20.get_config(), **{
      "model": "resnet8", "num_epochs": 2, "maxup.warmup_epochs": 0, "log_every_steps": 1,
      "checkpoint_every_steps": 2, "learning_rate": 0.05, **overrides})


def flat_config(config):
  """A config's leaves by dotted name: `{"maxup.num_copies": 4, ...}`."""
  return flax.traverse_util.flatten_dict(config.to_dict(), sep=".")


def command_line(config, base):
  """The `--config.K=V` overrides (as `train_py.run` takes them) that turn `base` into `config`."""
  default = flat_config(base)
  return {k: v for k, v in flat_config(config).items() if default.get(k) != v}


# ---------------------------------------------------------------------------
# A run's metrics.jsonl.


def records(workdir, split):
  """The records of one split ("train", "test", "summary", "host", ...), in the order written."""
  return [r for r in metrics.read_metrics(str(workdir)) if r["split"] == split]


def train_losses(workdir):
  """`{step: loss}` of every logged training step."""
  return {r["step"]: r["loss"] for r in records(workdir, "train")}
