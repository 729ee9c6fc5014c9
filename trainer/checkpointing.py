"""Orbax checkpoints of the training state (and the input state) in `workdir/checkpoints`.

A checkpoint of step s holds the items

  state:          the training state (`ocp.args.StandardSave`), and
  data_iterator:  when given, the training input iterator's state, written by
                  grain's own orbax handler (`grain.checkpoint.CheckpointSave`)
                  as one small JSON file per process,
                  `process_<index>-of-<count>.json`.

Restoring the state at step s and the input iterator continues exactly
where an uninterrupted run would be; a checkpoint saved without an input
state positions the iterator at its step.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
# Item names of a checkpoint.
STATE_ITEM = "state"
DATA_ITERATOR_ITEM = "data_iterator"


def create_manager(workdir: str, *, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
  """A manager of `workdir/checkpoints` keeping the newest `max_to_keep` checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  # Named items from the start: orbax otherwise fixes a manager's layout at
  # its first save or restore.
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options,
      item_names=(STATE_ITEM, DATA_ITERATOR_ITEM))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iterator: grain.DatasetIterator | None = None) -> None:
  """Starts saving `state` (and `data_iterator`'s state) as step `step`.

  The arrays are written in the background; the iterator's state is taken
  now, before this returns, so the iterator may advance right away. Orbax
  writes into a temporary folder and renames it when complete, so a crash
  mid-save leaves the previous checkpoint as the newest.

  Args:
    manager: from `create_manager`.
    step: the checkpoint's step.
    state: a pytree of arrays.
    data_iterator: a grain DatasetIterator (e.g. image_batches.train_iterator)
      positioned at `step`; every process saves its own state.
  """
  items = {STATE_ITEM: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items[DATA_ITERATOR_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(manager: ocp.CheckpointManager, state: Any,
                   data_iterator: grain.DatasetIterator | None = None) -> Any:
  """The newest checkpoint restored with `state`'s structure and shardings, else `state`.

  With `data_iterator`, also restores its state in place (and starts its
  prefetching, so that the first batch is prepared while the caller goes
  on). A checkpoint that holds no input state (written before it was saved)
  positions a TrainIterator at the checkpoint's step instead, as the input
  order is a function of the step.

  Args:
    manager: from `create_manager`.
    state: a pytree of arrays (or of jax.ShapeDtypeStruct) with the
      structure, shapes, dtypes and shardings to restore into.
    data_iterator: the training input iterator, fresh (at step 0).

  Returns:
    The restored state, or `state` when there is no checkpoint yet.

  Raises:
    ValueError: the checkpoint has the input state of other processes only
      and `data_iterator` cannot take it, or the iterator rejects the state
      (another seed, batch size or number of examples).
  """
  step = manager.latest_step()
  if step is None:
    return state
  # The manager's folder may be remote (epath), not only a local path.
  step_dir = manager.directory / str(step)
  abstract = _abstract(state)
  iterator_dir = step_dir / DATA_ITERATOR_ITEM
  items = {STATE_ITEM: ocp.args.StandardRestore(abstract)}
  if data_iterator is not None:
    if _has_state_of_every_process(iterator_dir):
      items[DATA_ITERATOR_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    elif _process_state_files(iterator_dir):
      # Saved by another number of processes. A TrainIterator's state is the
      # same in every process, so any process's state will do.
      _set_state_from_other_processes(data_iterator, iterator_dir)
    else:
      _seek(data_iterator, step, f"checkpoint {step_dir} holds no input state")
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE_ITEM]


def _process_state_files(iterator_dir: epath.Path) -> list[epath.Path]:
  """The per-process files of grain's handler, process_<index>-of-<count>.json."""
  return sorted(iterator_dir.glob("process_*-of-*.json")) if iterator_dir.is_dir() else []


def _has_state_of_every_process(iterator_dir: epath.Path) -> bool:
  count = jax.process_count()
  # The same answer in every process, so that all of them restore the same items.
  return all((iterator_dir / f"process_{index}-of-{count}.json").exists()
             for index in range(count))


def _set_state_from_other_processes(data_iterator: grain.DatasetIterator,
                                    iterator_dir: epath.Path) -> None:
  files = _process_state_files(iterator_dir)
  states = [json.loads(path.read_text()) for path in files]
  if any(other != states[0] for other in states[1:]):
    raise ValueError(
        f"The input state in {iterator_dir} was saved by processes with different states "
        f"({[path.name for path in files]}); it can only be restored with as many processes, "
        f"but this run has {jax.process_count()}.")
  logging.info("Restoring the input state saved by other processes from %s.", files[0])
  data_iterator.set_state(states[0])
  data_iterator.start_prefetch()


def _seek(data_iterator: grain.DatasetIterator, step: int, reason: str) -> None:
  """Positions a TrainIterator at `step` (its state is {'step': ..., ...})."""
  state = data_iterator.get_state()
  if "step" not in state:
    raise ValueError(f"{reason}, and {data_iterator} cannot be positioned at step {step}.")
  logging.warning("%s; the input pipeline continues at step %d.", reason, step)
  data_iterator.set_state({**state, "step": step})
  data_iterator.start_prefetch()


def _abstract(state):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def load_arrays(directory: str, step: int | None = None) -> Any:
  """A checkpoint's training state on the first local device, whatever topology saved it.

  For reading another run's results (fine-tuning, certification, analysis)
  without rebuilding its training state.

  Args:
    directory: a run's workdir or its `checkpoints` folder.
    step: which step; default the newest.
  """
  if os.path.isdir(os.path.join(directory, CHECKPOINT_DIR)):
    directory = os.path.join(directory, CHECKPOINT_DIR)
  steps = sorted(int(name) for name in _listdir(directory) if name.isdigit())
  if not steps:
    raise FileNotFoundError(f"no checkpoint found in {directory!r}.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory!r}; it has {steps}.")
  step_dir = os.path.join(os.path.abspath(directory), str(step))
  item = os.path.join(step_dir, STATE_ITEM)
  if not os.path.isdir(item):
    raise FileNotFoundError(
        f"checkpoint {step_dir!r} has no {STATE_ITEM!r} item; it has "
        f"{sorted(_listdir(step_dir))}.")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(item)
  tree = getattr(metadata, "item_metadata", metadata)
  tree = getattr(tree, "tree", tree)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(item, target)


def _listdir(directory: str) -> list[str]:
  try:
    return os.listdir(directory)
  except FileNotFoundError:
    return []
