"""Preemption notices: every process stops at the same step, after a checkpoint.

Cluster schedulers (Cloud TPU, SLURM, Kubernetes) send SIGTERM some time
before they evict a job. In a multi-process run, JAX's coordination service
catches the signal on whichever processes get it and agrees on one step at
which all of them save (`multihost_utils.reached_preemption_sync_point`). A
single process needs no agreement: a Python handler records the signal.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Tells the training loop when to checkpoint and stop because of a SIGTERM.

  `should_stop(step)` must be called by every process at every step (the
  multi-process protocol counts steps), and becomes true on all of them at
  the same step.
  """

  def __init__(self):
    self._received = False
    self._previous_handler = None
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._received = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._received
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self) -> None:
    """Gives SIGTERM back to the handler that had it before."""
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def __enter__(self) -> PreemptionWatcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
