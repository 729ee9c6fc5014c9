"""Shared pieces of the benchmarks: the project's own steps, interleaved timing, the environment.

Every benchmark builds its training steps exactly as `trainer.image.train_and_evaluate`
does (`functools.partial(train_step, ...)` under `jax.jit` with the state
donated), so what is timed is what users run. Timings are interleaved: each
round calls every variant once, so load from other processes on a shared
machine hits all variants alike, and ratios are taken of per-variant medians.
"""

from __future__ import annotations

import datetime
import functools
import inspect
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

# Runnable as `python benchmarks/NAME.py` from the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from trainer import xla_cpu  # noqa: E402

# The XLA:CPU defaults of train.py, so that what is timed is what users run;
# a benchmark's own --xla_flags setting of the same flag wins.
xla_cpu.apply_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar10_resnet20  # noqa: E402
from maxup_jax import losses, models  # noqa: E402
from trainer import image, language  # noqa: E402
from trainer import mesh as mesh_lib  # noqa: E402
from trainer.metrics import cpu_name  # noqa: E402

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)


def benchmark_config(model_name: str, batch_size: int, dtype: str = "float32"):
  """The CIFAR-10 recipe (crop + flip + Cutout 16, SGD momentum) with another model."""
  config = cifar10_resnet20.get_config()
  config.model = model_name
  config.batch_size = batch_size
  config.dtype = dtype
  return config


class Steps:
  """The jitted steps of one model and batch size, built from trainer.image.

  Attributes:
    model, tx, augmentation: as `train_and_evaluate` makes them.
    mesh, replicated, data_sharding: a one-axis 'data' mesh over `num_devices`.
  """

  def __init__(self, model_name: str, batch_size: int, *, dtype: str = "float32",
               num_devices: int = 1, donate: bool = True, remat: bool = False,
               config=None):
    """`config`: a training config whose augmentation and optimiser to use
    (its model, batch size and dtype must be the arguments); default the
    CIFAR-10 recipe of `benchmark_config`."""
    if config is None:
      config = benchmark_config(model_name, batch_size, dtype)
    elif (config.model, config.batch_size, config.dtype) != (model_name, batch_size, dtype):
      raise ValueError(f"config has model/batch_size/dtype {config.model}/{config.batch_size}/"
                       f"{config.dtype}, the arguments {model_name}/{batch_size}/{dtype}")
    self.config = config
    self.config.remat = remat
    self.batch_size = batch_size
    self.mesh = mesh_lib.create_mesh(num_devices)
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.data_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    self.model = models.create_model(model_name, num_classes=NUM_CLASSES,
                                     dtype=image.DTYPES[dtype], remat=remat)
    schedule = image.make_schedule(self.config, steps_per_epoch=100)
    init_key = jax.random.key(0)
    abstract_variables = jax.eval_shape(
        lambda: self.model.init(init_key, jnp.zeros((1,) + IMAGE_SHAPE), train=False))
    self.tx = image.make_optimizer(self.config, schedule, abstract_variables)
    self.augmentation = image.make_augmentation(self.config, NUM_CLASSES)
    self._init_key = init_key
    self.donate = donate

  def initial_state(self) -> image.TrainState:
    return image.initial_state(self.model, self.tx, IMAGE_SHAPE, self._init_key,
                               self.replicated)

  def batch(self, seed: int = 0) -> dict[str, jax.Array]:
    """A random uint8 batch, sharded like the training loop's."""
    rng = np.random.default_rng(seed)
    host = {
        "image": rng.integers(0, 256, (self.batch_size,) + IMAGE_SHAPE, dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, (self.batch_size,), dtype=np.int32),
    }
    return jax.device_put(host, self.data_sharding)

  def train_step(self, num_copies: int, mode: str = "two_pass") -> Callable:
    """The jitted `trainer.image.train_step`, as `train_and_evaluate` builds it."""
    kwargs = dict(model=self.model, tx=self.tx, augmentation=self.augmentation,
                  num_copies=num_copies, mode=mode, freeze_batch_norm=False)
    # The options train_and_evaluate passes too, where this version of the trainer has them.
    parameters = inspect.signature(image.train_step).parameters
    if "skip_nonfinite" in parameters:
      kwargs["skip_nonfinite"] = self.config.get("nonfinite") == "skip"
    if "copies_per_pass" in parameters:
      kwargs["copies_per_pass"] = self.config.maxup.copies_per_pass
    if "selection_model" in parameters:
      selection_dtype = self.config.maxup.get("selection_dtype", "")
      if selection_dtype and selection_dtype != self.config.dtype:
        kwargs["selection_model"] = models.create_model(
            self.config.model, num_classes=NUM_CLASSES, dtype=image.DTYPES[selection_dtype],
            remat=self.config.remat)
    step = functools.partial(image.train_step, **kwargs)
    return jax.jit(step, donate_argnums=0 if self.donate else ())

  def selection_forward(self, num_copies: int) -> Callable:
    """(d): the m-copy selection pass alone: losses of every copy, no gradient.

    The same per-example loss as `train_step` (augment, train-mode forward,
    cross-entropy), vmapped over the copies with stopped-gradient parameters
    and keyed as `maxup_loss` keys them; returns the winners and their losses
    so that nothing is dead code.
    """
    model, augmentation = self.model, self.augmentation

    def select(state, batch, key):
      images = image.to_unit_float(batch["image"])
      batch_size = images.shape[0]

      def loss_fn(params, keys):
        augmented, labels = augmentation(keys, images, batch["label"])
        logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, augmented,
                                train=True, mutable=["batch_stats"])
        return losses.softmax_cross_entropy(logits, labels)

      keys = jax.random.split(key, num_copies * batch_size).reshape(num_copies, batch_size)
      frozen = jax.lax.stop_gradient(state.params)
      copy_losses = jax.vmap(loss_fn, in_axes=(None, 0))(frozen, keys)
      selected = jnp.argmax(copy_losses, axis=0)
      return selected, copy_losses.max(axis=0)

    return jax.jit(select)


class StepRunner:
  """Calls a jitted train step on its own (donated) state; one call is one step."""

  def __init__(self, steps: Steps, step_fn: Callable, batch, is_train_step: bool = True):
    self.step_fn = step_fn
    self.batch = batch
    self.is_train_step = is_train_step
    self.state = steps.initial_state()
    self.key = jax.random.key(1)
    self.count = 0

  def __call__(self):
    self.count += 1
    key = jax.random.fold_in(self.key, self.count)
    if self.is_train_step:
      self.state, metrics = self.step_fn(self.state, self.batch, key)
      jax.block_until_ready(metrics)
    else:
      jax.block_until_ready(self.step_fn(self.state, self.batch, key))


class LanguageStepRunner:
  """Calls a language model's jitted train step on its own (donated) state; records CPU times per call."""

  def __init__(self, config, vocab_size, batch, length, num_copies, num_devices: int = 1):
    self.model = language.create_model(config, vocab_size)
    mesh = mesh_lib.create_mesh(num_devices)
    init = lambda: language.initial_train_state(self.model, config.batch_size, jax.random.key(0))
    self.state = jax.jit(init, out_shardings=language.train_state_shardings(
        jax.eval_shape(init), mesh))()
    self.step_fn = language.make_train_step(config, self.model, num_copies=num_copies)
    self.batch = jax.device_put(
        batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh_lib.DATA_AXIS)))
    self.length = jnp.int32(length)
    self.key = jax.random.key(1)
    self.count = 0
    self.cpu_times = []  # (user, system) seconds of each call.

  def __call__(self):
    self.count += 1
    before = os.times()
    self.state, metrics = self.step_fn(self.state, self.batch, self.length,
                                       jax.random.fold_in(self.key, self.count))
    jax.block_until_ready(metrics)
    after = os.times()
    self.cpu_times.append((after.user - before.user, after.system - before.system))


def timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_medians(variants: dict[str, Callable[[], Any]], repeats: int,
                        warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of every variant, called in turn `repeats` times.

  Each variant is first called `warmup` times (compilation, allocator
  warm-up). Returns the list of timings; take medians of these.
  """
  for fn in variants.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in variants}
  for _ in range(repeats):
    for name, fn in variants.items():
      times[name].append(timed(fn))
  return times


def median(values) -> float:
  return statistics.median(values)


def environment(**extra) -> dict[str, Any]:
  """Machine, versions, date and load: the header of every benchmark table."""
  import flax
  import jaxlib
  info = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "nproc": os.cpu_count(),
      "cpu": cpu_name(),
      "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})) +
                 f" x{jax.device_count()}",
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "loadavg": "%.2f %.2f %.2f" % os.getloadavg(),
  }
  info.update(extra)
  return info


def print_environment(**extra) -> None:
  for key, value in environment(**extra).items():
    print(f"# {key}: {value}")


def print_table(header: list[str], rows: list[list[Any]]) -> None:
  """A Markdown table, ready to paste into BENCHMARKS.md."""
  def fmt(value):
    if isinstance(value, float):
      return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---" for _ in header) + "|")
  for row in rows:
    print("| " + " | ".join(fmt(v) for v in row) + " |")
  sys.stdout.flush()
