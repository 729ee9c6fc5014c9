"""Orbax checkpoints of the training state in `workdir/checkpoints`.

The training state is everything a resumed run needs: the input order and the
random stream are functions of (seed, step), so restoring the state at step s
continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def create_manager(workdir: str, *, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
  """A manager of `workdir/checkpoints` keeping the newest `max_to_keep` checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options)


def restore_latest(manager: ocp.CheckpointManager, state: Any) -> Any:
  """The newest checkpoint restored with `state`'s structure and shardings, else `state`."""
  step = manager.latest_step()
  if step is None:
    return state
  return manager.restore(step, args=ocp.args.StandardRestore(_abstract(state)))


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts saving `state` as step `step`; it is written in the background.

  Orbax writes into a temporary folder and renames it when complete, so a
  crash mid-save leaves the previous checkpoint as the newest.
  """
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def _abstract(state):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def load_arrays(directory: str, step: int | None = None) -> Any:
  """A checkpoint's whole tree on the first local device, whatever topology saved it.

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
  item = os.path.join(os.path.abspath(directory), str(step), "default")
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
