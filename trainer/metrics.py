"""Where a run's numbers go: JSON lines and TensorBoard events in the workdir, on process 0 only."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Appends `{"step": s, "split": ..., name: value}` lines to `workdir/metrics.jsonl`.

  Also writes TensorBoard scalars under `workdir/tensorboard`. On processes
  other than 0 every call is a no-op, so callers never test the process index.
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._file = None
    self._tensorboard = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # TensorBoard files are a convenience, JSON lines the record.
      logging.warning("tensorboardX is not installed; writing %s only.", METRICS_FILE)
    else:
      self._tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {name: _to_python(value) for name, value in metrics.items()}
    self._file.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **values}) + "\n")
    if self._tensorboard is not None:
      for name, value in values.items():
        if isinstance(value, (int, float)):
          self._tensorboard.add_scalar(f"{split}/{name}", value, int(step))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl`, in the order written."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()
