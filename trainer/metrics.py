"""Where a run's numbers go: JSON lines and TensorBoard events in the workdir, on process 0 only."""

from __future__ import annotations

import json
import logging
import os
import platform
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


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU, specific enough to tell machines apart whose vendors' names are the same.

  Cloud VMs often report only a family name ("AMD EPYC"), so the x86 family
  and model numbers and the widest vector extension (which decides XLA:CPU's
  speed) are added where /proc/cpuinfo gives them.
  """
  fields = {}
  try:
    with open(cpuinfo) as f:
      for line in f:
        if not line.strip():
          break  # The first processor's block is enough.
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    return platform.processor() or platform.machine()
  name = fields.get("model name") or platform.processor() or platform.machine()
  flags = set(fields.get("flags", "").split())
  details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []
  vector = next((ext for ext in ("avx512f", "avx2", "avx") if ext in flags), None)
  if vector:
    details.append(vector.upper().removesuffix("F"))
  return f"{name} ({', '.join(details)})" if details else name


def host_record() -> dict:
  """What a run's wall times depend on: CPU, cores, devices and versions."""
  return {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "platform": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
          "num_processes": jax.process_count(), "jax": jax.__version__,
          "python": platform.python_version()}


def read_metrics(workdir: str) -> list[dict]:
  """All records of `workdir/metrics.jsonl`, in the order written."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def _to_python(value):
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()
