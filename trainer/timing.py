"""Timing of training steps side by side, and the environment header every timing table carries.

The benchmarks (`benchmarks/`) and the equal-time measurement of the results
(`results/equal_time.py`) both compare steps on machines that other
processes share. So timing is interleaved: every round calls each variant
once, in turn, and load from elsewhere hits all variants alike; ratios are
taken of per-variant medians (or per round). Every table starts with the
machine, the versions, the date and the load it was measured under
(`environment`), since a number means little without them.
"""

from __future__ import annotations

import importlib.metadata
import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax

from trainer.metrics import cpu_name


def timed(fn: Callable[[], Any]) -> float:
  """Seconds one call of `fn` takes."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_medians(variants: dict[str, Callable[[], Any]], repeats: int,
                        warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of every variant, called in turn `repeats` times.

  Each variant is first called `warmup` times (compilation, allocator
  warm-up). Returns the list of timings of every variant, in round order;
  take medians of these (`median`), or of per-round ratios.
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


class StepRunner:
  """Calls a jitted step on its own state, blocking until it is done: one call, one step.

  `step_fn(state, *inputs, key)` with a fresh key per call (the call count
  folded into `key`). A train step returns `(new_state, metrics)` and the
  runner keeps the new state, so a step that donates its state gets a live
  one every time; with `updates_state=False` the step's output is only
  waited for (a pass that computes without training, e.g. MaxUp's selection
  alone). Each runner needs a state of its own when states are donated.

  Attributes:
    state: the state the next call starts from.
    count: the calls so far.
    cpu_times: (user, system) CPU seconds of the process during each call.
  """

  def __init__(self, step_fn: Callable, state: Any, inputs: tuple, key: jax.Array,
               updates_state: bool = True):
    self.step_fn = step_fn
    self.state = state
    self.inputs = inputs
    self.key = key
    self.updates_state = updates_state
    self.count = 0
    self.cpu_times: list[tuple[float, float]] = []

  def __call__(self) -> None:
    self.count += 1
    key = jax.random.fold_in(self.key, self.count)
    before = os.times()
    out = self.step_fn(self.state, *self.inputs, key)
    if self.updates_state:
      self.state, metrics = out
      jax.block_until_ready(metrics)
    else:
      jax.block_until_ready(out)
    after = os.times()
    self.cpu_times.append((after.user - before.user, after.system - before.system))


def environment(**extra) -> dict[str, Any]:
  """Machine, versions, date and load: the header of every timing table; `extra` is appended."""
  import flax
  info = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "nproc": os.cpu_count(),
      "cpu": cpu_name(),
      "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})) +
                 f" x{jax.device_count()}",
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": importlib.metadata.version("jaxlib"),
      "flax": flax.__version__,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "loadavg": "%.2f %.2f %.2f" % os.getloadavg(),
  }
  info.update(extra)
  return info


def print_environment(**extra) -> None:
  """`environment(**extra)` as `# key: value` lines, above a table."""
  for key, value in environment(**extra).items():
    print(f"# {key}: {value}")
