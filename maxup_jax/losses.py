"""Per-example classification losses and metrics for hard or soft labels.

MaxUp compares the losses of the copies of each example, so losses here are
per example, never reduced over the batch. Labels are either integer classes
`[...]` or soft targets `[..., K]` (what `cutmix` and `mixup` produce).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  r"""Cross-entropy of softmax(logits) against hard or soft labels.

  .. math::  L = -\sum_k y_k \log \mathrm{softmax}(z)_k

  Computed in float32 (or wider) whatever the logits' dtype, so bfloat16
  logits do not lose precision in the log-sum-exp.

  Args:
    logits: `[..., K]` floating point; typically `[B, K]`.
    labels: integer classes `[...]` in [0, K) (any integer dtype; values out
      of range are not checked), or soft targets `[..., K]` floating point.

  Returns:
    Per-example losses `[...]`, float32 (or the logits' dtype if wider).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  logits = _as_float_logits(logits, "softmax_cross_entropy")
  if jnp.issubdtype(labels.dtype, jnp.integer):
    if labels.shape != logits.shape[:-1]:
      raise ValueError(
          f"integer labels must have shape {logits.shape[:-1]} (logits shape "
          f"{logits.shape} without the class axis); got {labels.shape}."
      )
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels.astype(jnp.int32)
    )
  if jnp.issubdtype(labels.dtype, jnp.floating):
    if labels.shape != logits.shape:
      raise ValueError(
          f"soft labels must have the logits' shape {logits.shape}; got "
          f"{labels.shape}."
      )
    return optax.softmax_cross_entropy(logits, labels.astype(logits.dtype))
  raise TypeError(
      f"labels must be integer classes or floating-point soft labels, got "
      f"dtype {labels.dtype}."
  )


def topk_correct(logits: Array, labels: Array, k: int = 1) -> Array:
  """Whether the true class is among the `k` highest logits, per example.

  Soft labels count their arg-max class as the true one (the dominant image
  of a CutMix / Mixup pair). Ties between logits go to the lower class
  index, as in `jax.lax.top_k`.

  Args:
    logits: `[..., K]`.
    labels: integer classes `[...]` or soft targets `[..., K]`.
    k: a Python int in [1, K]; 1 gives top-1 accuracy, 5 top-5.

  Returns:
    Boolean `[...]`; its mean is the top-k accuracy.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  logits = _as_float_logits(logits, "topk_correct")
  num_classes = logits.shape[-1]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
    raise ValueError(
        f"k must be a Python int in [1, {num_classes}] (the number of "
        f"classes), got {k!r}."
    )
  if jnp.issubdtype(labels.dtype, jnp.floating) and labels.shape == logits.shape:
    labels = jnp.argmax(labels, axis=-1)
  elif not (jnp.issubdtype(labels.dtype, jnp.integer)
            and labels.shape == logits.shape[:-1]):
    raise ValueError(
        f"labels must be integer classes of shape {logits.shape[:-1]} or soft "
        f"labels of shape {logits.shape}; got dtype {labels.dtype} and shape "
        f"{labels.shape}."
    )
  _, top_classes = jax.lax.top_k(logits, k)
  return jnp.any(top_classes == labels[..., None].astype(top_classes.dtype), axis=-1)


def _as_float_logits(logits: Array, name: str) -> Array:
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{name} expects floating-point logits, got {logits.dtype}.")
  if logits.ndim < 1:
    raise ValueError(f"{name} expects logits of shape [..., K], got a scalar.")
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
