"""The training loop every task shares.

A task (image classification, language modelling) brings its state, its
training step and what happens after a step (evaluation, phase changes);
`run` owns everything else a long run needs:

* resume from the newest checkpoint in `workdir/checkpoints` (with the input
  iterator's state, if the task has one), checkpoint every
  `config.checkpoint_every_steps` steps, when the task asks and at the end;
* SIGTERM: every process checkpoints the same step and `run` returns a
  summary with `preempted=True` (train.py then exits 0);
* NaN/inf (`config.nonfinite`): "stop" raises `FloatingPointError` naming
  the first bad step and the newest checkpoint, which predates it, and never
  saves a bad state; "skip" relies on the step leaving the state unchanged;
* `metrics.jsonl` + TensorBoard (process 0), the progress bar, a profiler
  trace of `config.profile_steps` steps, and a final summary line.

Per step, `run` calls `task.train_step`, logs the metric window when due,
calls `task.after_step` (evaluation), then checkpoints when due.
"""

from __future__ import annotations

import abc
import contextlib
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from trainer import checkpointing, core
from trainer import metrics as metrics_lib
from trainer import preemption, progress_bar

NONFINITE_POLICIES = ("stop", "skip")


CONFIG_FILE = "config.json"  # Every run's config, in its workdir.


def check_config(errors: core.ConfigErrors, config, num_devices: int) -> None:
  """Records in `errors` what is wrong with the loop's own config fields."""
  errors.int_at_least("log_every_steps", config.log_every_steps, 1)
  errors.int_at_least("checkpoint_every_steps", config.checkpoint_every_steps, 1)
  keep = config.keep_checkpoints
  errors.check(keep is None or core.is_int_at_least(keep, 1),
               f"keep_checkpoints={keep!r}; must be a positive int (or None = keep all)")
  errors.one_of("nonfinite", config.nonfinite, NONFINITE_POLICIES)
  errors.int_at_least("profile_steps", config.profile_steps, 0, "0 = off")
  if config.expected_device_count:
    errors.check(config.expected_device_count == num_devices,
                 f"expected_device_count={config.expected_device_count} but the run has "
                 f"{num_devices} devices; the preset's global batch {config.batch_size} assumes "
                 f"{config.batch_size // config.expected_device_count} per device")


def create_mesh(config) -> jax.sharding.Mesh:
  """The run's one-axis ('data') mesh: `config.num_devices` devices, 0 = all."""
  return core.create_mesh(config.num_devices)


class Output:
  """Where a task reports: metric records (process 0 writes them) and lines above the bar."""

  def __init__(self, writer: metrics_lib.MetricWriter, bar):
    self._writer, self._bar = writer, bar

  def write(self, step: int, split: str, record: Mapping[str, Any]) -> None:
    self._writer.write(step, split, record)

  def echo(self, line: str) -> None:
    self._bar.write(line)

  def postfix(self, **values) -> None:
    self._bar.set_postfix(**values)


class Task(abc.ABC):
  """A training recipe as `run` drives it; it holds its state between calls.

  Attributes:
    total_steps: the run's steps, or an upper bound when `finished` can end
      it earlier (the progress bar's length).
    unit: what `train_step` counts in `units` ('images', 'tokens'); the
      records report `{unit}_per_second`.
    data_iterator: an iterator with `get_state()` / `set_state()` saved
      with every checkpoint, or None when the input order is a function of
      the checkpointed state alone.
  """

  total_steps: int
  unit: str = "examples"
  data_iterator: Any = None

  @abc.abstractmethod
  def checkpoint_tree(self) -> Any:
    """Everything a resumed run needs, one pytree of arrays (the current state)."""

  @abc.abstractmethod
  def restore(self, tree: Any) -> int:
    """Takes up a tree of `checkpoint_tree`'s structure; returns the steps it has done."""

  @abc.abstractmethod
  def finished(self, step: int) -> bool:
    """Whether training is over after `step` steps."""

  @abc.abstractmethod
  def train_step(self, step: int) -> tuple[Mapping[str, jax.Array], Mapping[str, float]]:
    """Runs step `step` (0-based) on the next batch.

    Returns:
      (metrics, host): on-device scalar metrics, including `nonfinite`
      (1.0 if the step's loss or gradient was NaN/inf), which `run` averages
      over each logging window without waiting for the device; and host-side
      numbers, summed over the window: `host[self.unit]` (examples or tokens
      trained on) becomes `{unit}_per_second`, the others are averaged.
    """

  def train_record(self, means: dict, step: int) -> dict:
    """The logged training record from the window's means (adds e.g. the epoch)."""
    return means

  def start(self, out: Output) -> None:
    """Called once at the start of a fresh (not resumed) run, e.g. to log the model's size."""

  def after_step(self, step: int, out: Output) -> bool:
    """Evaluation and phase changes after `step` steps; True to checkpoint now."""
    return False

  @abc.abstractmethod
  def summary(self, out: Output, preempted: bool) -> dict:
    """The task's final scores (a preempted run may skip costly evaluations)."""

  def close(self) -> None:
    """Releases what the task holds open (input threads or processes); `run` calls it last."""


def run(task: Task, config, workdir: str) -> dict:
  """Trains `task` until it is finished or preempted; everything goes under `workdir`.

  Restarting with the same config and workdir resumes from the newest
  checkpoint; the task's state and input order make the resumed run equal
  to an uninterrupted one.

  Returns:
    The task's summary plus `steps`, `steps_this_run`, `seconds` (wall time
    of this call), `{unit}_per_second` (steps after the first compiled one,
    evaluation and checkpoints included) and `preempted`.

  Raises:
    FloatingPointError: a NaN/inf loss, gradient or weight under `nonfinite="stop"`.
  """
  with contextlib.closing(task):
    return _run(task, config, workdir)


def _run(task: Task, config, workdir: str) -> dict:
  started = time.time()
  manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  start_step = task.restore(checkpointing.restore_latest(
      manager, task.checkpoint_tree(), data_iterator=task.data_iterator))
  writer = metrics_lib.MetricWriter(workdir)
  if start_step == 0:
    _write_config(config, workdir)
  # Every start, resumes included: a resumed run's parts may run on different machines.
  writer.write(start_step, "host", metrics_lib.host_record())

  def check_finite(window):
    bad_step = window.first_nonfinite_step()
    if bad_step is not None and config.nonfinite == "stop":
      manager.wait_until_finished()
      raise FloatingPointError(
          f"the loss, gradient or weights became NaN/inf at step {bad_step}; the newest "
          f"checkpoint, step {manager.latest_step()} in {manager.directory}, predates it. "
          "Lower the learning rate, or set nonfinite='skip' to skip such updates.")

  def log(window, step):
    check_finite(window)
    means = window.read(task.unit)
    record = task.train_record(means, step)
    writer.write(step, "train", record)
    return record

  def save(step):
    checkpointing.save(manager, step, task.checkpoint_tree(), data_iterator=task.data_iterator)

  window = MetricWindow()
  step, steady_start, steady_units = start_step, None, 0.0
  preempted = False
  profiler = Profiler(workdir, first_step=start_step, num_steps=config.profile_steps)
  with preemption.PreemptionWatcher() as watcher, profiler, \
      progress_bar.bar(total=task.total_steps, initial=start_step, desc="train") as bar:
    out = Output(writer, bar)
    if start_step == 0:
      task.start(out)
    while not task.finished(step):
      profiler.at(step)
      metrics, host = task.train_step(step)
      step += 1
      if steady_start is None:
        # Throughput is measured from here on, after the first compilation.
        jax.block_until_ready(metrics)
        steady_start = time.time()
      else:
        steady_units += host[task.unit]
      window.add(step, metrics, host)
      bar.update(1)
      preempted = watcher.should_stop(step)

      if step % config.log_every_steps == 0 or step == task.total_steps or preempted:
        record = log(window, step)
        out.postfix(**{k: f"{record[k]:.3g}" for k in ("loss", "perplexity", "accuracy")
                       if k in record})
      checkpoint_now = task.after_step(step, out)
      if (step % config.checkpoint_every_steps == 0 or checkpoint_now or preempted
          or task.finished(step)):
        check_finite(window)  # Never checkpoint a state that went NaN.
        save(step)
      if preempted:
        out.echo(f"preempted: saved step {step} in {manager.directory}; run again to resume.")
        break
    if window.steps:  # A task that finished before its step bound.
      log(window, step)
    bar.total = step
    bar.refresh()
    training_seconds = time.time() - steady_start if steady_start is not None else None
    summary = dict(task.summary(out, preempted))

  manager.wait_until_finished()
  manager.close()
  steps_run = step - start_step
  summary.update({
      "steps": step,
      "steps_this_run": steps_run,
      "seconds": time.time() - started,
      f"{task.unit}_per_second": (steady_units / training_seconds
                                  if steps_run > 1 and training_seconds else None),
      "preempted": preempted,
  })
  writer.write(step, "summary", {k: v for k, v in summary.items() if v is not None})
  writer.close()
  return summary


class MetricWindow:
  """Step metrics since the last read, summed on device so that steps never wait on the host."""

  _NONE = np.iinfo(np.int32).max

  def __init__(self):
    self._reset()

  def _reset(self):
    self._sums, self._host, self.steps, self._start = None, {}, 0, time.time()
    self._first_nonfinite = None

  def add(self, step: int, metrics: Mapping[str, jax.Array],
          host: Mapping[str, float] | None = None) -> None:
    """Adds step `step`'s (1-based) device metrics and host-side numbers."""
    bad = jnp.where(metrics["nonfinite"] > 0, step, self._NONE)
    if self._sums is None:
      self._sums, self._first_nonfinite = dict(metrics), bad
    else:
      self._sums = jax.tree.map(jnp.add, self._sums, dict(metrics))
      self._first_nonfinite = jnp.minimum(self._first_nonfinite, bad)
    for name, value in (host or {}).items():
      self._host[name] = self._host.get(name, 0.0) + value
    self.steps += 1

  def first_nonfinite_step(self) -> int | None:
    """Reads (and so waits for) the first step with a NaN/inf since the last read."""
    if self._first_nonfinite is None:
      return None
    step = int(self._first_nonfinite)
    return None if step == self._NONE else step

  def read(self, unit: str | None = None) -> dict:
    """Means over the window, `{unit}_per_second`, then a new window starts."""
    means = {k: float(v) / self.steps for k, v in jax.device_get(self._sums).items()}
    seconds = time.time() - self._start
    for name, total in self._host.items():
      if name == unit:
        means[f"{unit}_per_second"] = total / seconds
      else:
        means[name] = total / self.steps
    self._reset()
    return means


class Profiler:
  """Traces `num_steps` steps from `first_step` on into `workdir/profile` (TensorBoard, Perfetto).

  The first step of a run compiles; tracing starts after it, so that the
  trace shows steady-state steps.
  """

  def __init__(self, workdir: str, first_step: int, num_steps: int):
    self._dir = os.path.join(workdir, "profile")
    self._first, self._last = first_step + 1, first_step + 1 + num_steps
    self._active = False
    self._enabled = num_steps > 0

  def at(self, step: int) -> None:
    if not self._enabled:
      return
    if step == self._first and not self._active:
      jax.profiler.start_trace(self._dir)
      self._active = True
    elif step == self._last and self._active:
      self.stop()

  def stop(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def _write_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
