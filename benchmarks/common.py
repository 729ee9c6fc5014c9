"""Shared pieces of the benchmarks: the trainer's own steps, random batches, tables.

Every benchmark times the steps `train.py` trains with: it builds a config
(`benchmark_config`, or a config of configs/) and the task's factory builds
the jitted steps (`trainer.image.build_steps`, `trainer.language.build_steps`),
so what is timed is what users run. A variant of a step (another m, mode or
copies per pass) is another config (`with_maxup`) built again. The timing
itself (interleaved rounds, the environment header) is `trainer.timing`.

Run the benchmarks as modules from the repository root:
`python -m benchmarks.NAME`.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Callable

from trainer import xla_cpu

# The XLA:CPU defaults of train.py, so that what is timed is what users run;
# a benchmark's own --xla_flags setting of the same flag wins.
xla_cpu.apply_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar10_resnet20  # noqa: E402
from trainer import core, image, image_data, language  # noqa: E402
from trainer.timing import StepRunner  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def benchmark_config(model_name: str, batch_size: int, dtype: str = "float32",
                     remat: bool = False) -> ml_collections.ConfigDict:
  """The CIFAR-10 recipe (crop + flip + Cutout 16, SGD momentum) with another model."""
  config = cifar10_resnet20.get_config()
  config.model = model_name
  config.batch_size = batch_size
  config.dtype = dtype
  config.remat = remat
  return config


def with_maxup(config: ml_collections.ConfigDict, **maxup_fields) -> ml_collections.ConfigDict:
  """A copy of `config` whose `maxup` fields are set as given, e.g. `num_copies=4, mode=...`.

  The factories build the train steps of m in {1, maxup.num_copies} with the
  config's MaxUp mode and copies per pass, so every other variant of a step
  is a config of its own.
  """
  config = copy.deepcopy(config)
  for name, value in maxup_fields.items():
    config.maxup[name] = value
  return config


def image_steps(config: ml_collections.ConfigDict, num_devices: int = 1) -> image.Steps:
  """`trainer.image.build_steps` of `config` on the first `num_devices` devices.

  For the published shapes of `config.dataset` (cut to the config's
  `num_train_examples`, as a run loads it); no data is read.
  """
  facts = image_data.published_dataset_facts(config.dataset, config.num_train_examples,
                                             config.num_eval_examples)
  return image.build_steps(config, core.create_mesh(num_devices), facts)


def random_batch(steps: image.Steps, batch_size: int, seed: int = 0) -> dict[str, jax.Array]:
  """A random uint8 image batch of the steps' dataset shapes, sharded like the training loop's."""
  rng = np.random.default_rng(seed)
  abstract = steps.abstract_batch(batch_size)
  host = {
      "image": rng.integers(0, 256, abstract["image"].shape, dtype=np.uint8),
      "label": rng.integers(0, steps.facts.num_classes, abstract["label"].shape, dtype=np.int32),
  }
  return jax.device_put(host, steps.data_sharding)


def image_runner(steps: image.Steps, step_fn: Callable, batch,
                 updates_state: bool = True) -> StepRunner:
  """Calls `step_fn(state, batch, key)` on a freshly initialised state of its own."""
  return StepRunner(step_fn, steps.init_state(), (batch,), jax.random.key(1), updates_state)


def undonated(step_fn: Callable) -> Callable:
  """The step without state donation: the factory's step inside a `jax.jit` that donates nothing.

  The factories always donate the state (train.py's steps do); donation only
  applies to the arguments of the outermost jitted call, so the same
  program, wrapped, writes its new state to buffers of its own.
  """
  return jax.jit(step_fn)


def selection_forward(config: ml_collections.ConfigDict, steps: image.Steps,
                      num_copies: int) -> Callable:
  """(d): the m-copy selection pass alone: losses of every copy, no gradient.

  Nothing in the trainer runs the selection on its own, so it is built here
  from the train step's per-example loss (`image.copy_loss_fn`), vmapped over
  the copies with stopped-gradient parameters and keyed as `maxup_loss` keys
  them; returns the winners and their losses so that nothing is dead code.
  """
  augmentation = image.make_augmentation(config.augment, config.dataset, steps.facts.num_classes)

  def select(state, batch, key):
    batch_size = batch["label"].shape[0]
    loss_fn = image.copy_loss_fn(steps.model, augmentation, state.batch_stats)
    copy_loss = lambda params, keys: loss_fn(params, batch, keys)[0]
    keys = jax.random.split(key, num_copies * batch_size).reshape(num_copies, batch_size)
    copy_losses = jax.vmap(copy_loss, in_axes=(None, 0))(jax.lax.stop_gradient(state.params),
                                                         keys)
    return jnp.argmax(copy_losses, axis=0), copy_losses.max(axis=0)

  return jax.jit(select)


def language_runner(config: ml_collections.ConfigDict, vocab_size: int, batch: dict[str, Any],
                    length: int, num_copies: int, num_devices: int = 1) -> StepRunner:
  """`config`'s language-model train step with `num_copies` copies (`language.build_steps`)
  on a fresh state of its own, called as `step(state, batch, length, key)`."""
  steps = language.build_steps(with_maxup(config, num_copies=num_copies),
                               core.create_mesh(num_devices), vocab_size)
  return StepRunner(steps.train_steps[num_copies], steps.init_state(),
                    (jax.device_put(batch, steps.data_sharding), jnp.int32(length)),
                    jax.random.key(1))


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
