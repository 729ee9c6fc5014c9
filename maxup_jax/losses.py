"""Per-example classification losses and metrics for hard or soft labels.

MaxUp compares the losses of the copies of each example, so losses here are
per example, never reduced over the batch. Labels are either integer classes
`[...]` or soft targets `[..., K]` (what `cutmix` and `mixup` produce).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from maxup_jax import _checks, _sharding

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
  _checks.check_int("k", k, 1, num_classes, numpy=False, reason="the number of classes",
                    wrong_type=ValueError)
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


# ---------------------------------------------------------------------------
# Cross-entropy of a linear softmax layer, without its logits.


def linear_softmax_cross_entropy(inputs: Array, weight: Array, bias: Array, labels: Array, *,
                                 num_valid_rows: Array | int | None = None,
                                 chunk_size: int = 1024, row_block_size: int = 128) -> Array:
  r"""Cross-entropy of softmax(inputs W^T + b) at integer labels, chunked over the classes.

  .. math::
    z = x W^\top + b, \qquad L = \log \sum_k e^{z_k} - z_y

  the value of `softmax_cross_entropy(inputs @ weight.T + bias, labels)`
  (up to float rounding), without ever holding the `[..., K]` logits. The K
  classes are cut into `ceil(K / chunk_size)` chunks of equal size (the last
  one padded with classes of logit -inf) and the rows into blocks of
  at most `row_block_size` (equal blocks, so a few rows are not padded to
  a whole block; with fewer rows than `row_block_size` the chunks widen to
  keep about `row_block_size * chunk_size` logits per tile); for every
  chunk and block, the `[row_block_size, chunk]`
  logits update a running maximum and sum of exponentials per row (the
  streaming log-sum-exp). The gradient (a custom VJP) walks the chunks and
  blocks again, recomputing the logits from the saved log-sum-exp:

  .. math::
    \partial L / \partial z = g\,(\mathrm{softmax}(z) - \mathrm{onehot}(y)),
    \quad dx = \partial z\, W, \quad dW = \partial z^\top x, \quad db = \textstyle\sum \partial z

  so both passes use `O(row_block_size * chunk_size)` memory for logits
  rather than `O(N * K)` for N rows. Worth it when the logits are large (a
  language model's `[B, T, vocabulary]` output); for a handful of classes
  use `softmax_cross_entropy`.

  Blocks are cut along the first axis only; the other leading axes stay
  whole in every block (`[T, B, D]` is walked a few time steps at a time,
  all B streams together), so when the inputs are sharded along one of
  them, e.g. a language model's streams over devices under `jax.jit`, every
  device computes the logits of its own rows only. A 2-D `[N, D]` input is
  walked in blocks of rows, which a partitioner cannot split.

  Args:
    inputs: float32 `[..., D]` features (the last hidden layer).
    weight: `[K, D]` output weights, one row per class (a tied embedding
      matrix as it is).
    bias: `[K]`.
    labels: integer `[...]` in [0, K) (values out of range are not checked).
    num_valid_rows: None, or a (traced) int n: only the first n rows of the
      inputs in row-major order of the leading axes are computed; the others
      get loss 0 and zero gradient, and row blocks wholly past n are skipped
      (e.g. the padded time steps of a time-major `[T, B, D]` segment).

    chunk_size: the most classes per chunk (for `row_block_size` rows or
      more), a Python int >= 1.
    row_block_size: rows per block, a Python int >= 1.

  Returns:
    float32 `[...]` per-row losses.
  """
  inputs, weight, bias = (jnp.asarray(x, jnp.float32) for x in (inputs, weight, bias))
  labels = jnp.asarray(labels)
  for name, value in (("chunk_size", chunk_size), ("row_block_size", row_block_size)):
    _checks.check_int(name, value, 1, numpy=False, wrong_type=ValueError)
  if weight.ndim != 2 or bias.shape != weight.shape[:1] or inputs.shape[-1:] != weight.shape[1:]:
    raise ValueError(
        f"expected inputs [..., D], weight [K, D] and bias [K]; got {inputs.shape}, "
        f"{weight.shape} and {bias.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != inputs.shape[:-1]:
    raise ValueError(
        f"labels must be integer classes of shape {inputs.shape[:-1]}; got dtype "
        f"{labels.dtype} and shape {labels.shape}.")
  # [N, S, D]: blocks walk N; the S rows of each of its entries stay together.
  if inputs.ndim < 2:
    inputs, labels = inputs[None], labels[None]
  rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
  num_rows = rows.shape[0] * rows.shape[1]
  if num_valid_rows is None:
    num_valid_rows = num_rows
  num_valid_rows = jnp.minimum(jnp.asarray(num_valid_rows, jnp.int32), num_rows)
  row_block = _equal_parts(rows.shape[0], max(1, row_block_size // rows.shape[1]))
  # Fewer rows than a block: wider chunks, so a tile keeps about as many logits and a
  # handful of rows is not walked through many tiny chunks.
  chunk_size = max(chunk_size, chunk_size * row_block_size // (row_block * rows.shape[1]))
  losses = _linear_cross_entropy(rows, weight, bias,
                                 labels.reshape(rows.shape[:2]).astype(jnp.int32),
                                 num_valid_rows, chunk_size, row_block)
  return losses.reshape(labels.shape)


def _equal_parts(total: int, most: int) -> int:
  """The size of the fewest equal parts of at most `most` that cover `total` (padding < parts)."""
  parts = max(1, -(-total // most))
  return -(-total // parts)


def _class_chunks(weight: Array, bias: Array, chunk_size: int) -> tuple[Array, Array, int]:
  """`[C, S, D]` weight and `[C, S]` bias chunks of equal size S <= chunk_size; padded classes
  have zero weights and bias -inf, so their logit is -inf and their probability 0."""
  num_classes = weight.shape[0]
  size = _equal_parts(num_classes, chunk_size)
  num_chunks = -(-num_classes // size)
  pad = num_chunks * size - num_classes
  weight = jnp.pad(weight, ((0, pad), (0, 0))).reshape(num_chunks, size, weight.shape[1])
  bias = jnp.pad(bias, (0, pad), constant_values=-jnp.inf).reshape(num_chunks, size)
  return weight, bias, size


def _row_blocks(x: Array, block: int, fill=0) -> Array:
  """`[N, S, ...]` -> `[ceil(N / block), block, S, ...]`, the last block padded with `fill`."""
  pad = -x.shape[0] % block
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape((-1, block) + x.shape[1:])


def _num_blocks(num_rows: Array, rows: Array, block: int) -> Array:
  """The blocks holding the first `num_rows` rows of `rows` `[N, S, D]`, `block` entries of N each."""
  rows_per_block = block * rows.shape[1]
  return (num_rows + rows_per_block - 1) // rows_per_block


def _valid(rows: Array, num_rows: Array) -> Array:
  """`[N, S]`: True for the first `num_rows` rows in row-major order."""
  index = jnp.arange(rows.shape[0])[:, None] * rows.shape[1] + jnp.arange(rows.shape[1])
  return index < num_rows


def _log_sum_exp_and_loss(rows, weight, bias, labels, num_rows, chunk_size, row_block):
  """(losses `[N, S]`, log-sum-exp `[N, S]`) of `rows @ weight.T + bias` at `labels`, chunk by
  chunk; rows from `num_rows` on get loss 0 (their log-sum-exp is meaningless)."""
  weight_chunks, bias_chunks, _ = _class_chunks(weight, bias, chunk_size)
  row_blocks = _row_blocks(rows, row_block)
  num_blocks = _num_blocks(num_rows, rows, row_block)

  def add_chunk(carry, chunk):
    chunk_weight, chunk_bias = chunk

    def add_block(i, carry):
      running_max, running_sum = carry  # [num_blocks, row_block, S] each.
      logits = row_blocks[i] @ chunk_weight.T + chunk_bias
      old_max = running_max[i]
      new_max = jnp.maximum(old_max, jnp.max(logits, axis=-1))
      new_sum = (running_sum[i] * jnp.exp(old_max - new_max)
                 + jnp.sum(jnp.exp(logits - new_max[..., None]), axis=-1))
      return running_max.at[i].set(new_max), running_sum.at[i].set(new_sum)

    # Blocks past num_rows are never visited: their compute is skipped, not masked.
    return jax.lax.fori_loop(0, num_blocks, add_block, carry), None

  # Built from the rows, so that they are sharded like them (explicit sharding).
  per_row = row_blocks[..., 0]
  start = (jnp.full_like(per_row, -jnp.inf), jnp.zeros_like(per_row))
  (running_max, running_sum), _ = jax.lax.scan(add_chunk, start, (weight_chunks, bias_chunks))
  log_sum_exp = (running_max + jnp.log(running_sum)).reshape((-1,) + rows.shape[1:2])
  log_sum_exp = log_sum_exp[:rows.shape[0]]
  # The label's logit directly: one row of W per example instead of a search of the chunks.
  label_logits = (jnp.sum(rows * _sharding.take_rows(weight, labels), axis=-1)
                  + _sharding.take_rows(bias, labels))
  return jnp.where(_valid(rows, num_rows), log_sum_exp - label_logits, 0.0), log_sum_exp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _linear_cross_entropy(rows, weight, bias, labels, num_rows, chunk_size, row_block):
  return _log_sum_exp_and_loss(rows, weight, bias, labels, num_rows, chunk_size, row_block)[0]


def _linear_cross_entropy_fwd(rows, weight, bias, labels, num_rows, chunk_size, row_block):
  losses, log_sum_exp = _log_sum_exp_and_loss(rows, weight, bias, labels, num_rows, chunk_size,
                                              row_block)
  return losses, (rows, weight, bias, labels, num_rows, log_sum_exp)


def _linear_cross_entropy_bwd(chunk_size, row_block, residuals, loss_grads):
  rows, weight, bias, labels, num_rows, log_sum_exp = residuals
  num_classes, features = weight.shape
  weight_chunks, bias_chunks, size = _class_chunks(weight, bias, chunk_size)
  starts = jnp.arange(weight_chunks.shape[0], dtype=jnp.int32) * size
  valid = _valid(rows, num_rows)
  num_blocks = _num_blocks(num_rows, rows, row_block)
  row_blocks = _row_blocks(rows, row_block)
  label_blocks = _row_blocks(labels, row_block)
  grad_blocks = _row_blocks(jnp.where(valid, loss_grads, 0.0), row_block)
  # +inf: padding rows get probability 0 (not exp(b - 0), which may overflow).
  lse_blocks = _row_blocks(jnp.where(valid, log_sum_exp, jnp.inf), row_block, fill=jnp.inf)

  # Under explicit sharding the weight gradient sums over sharded rows: say it is replicated.
  replicated = jax.sharding.PartitionSpec() if _sharding.explicit_spec(rows) else None

  def chunk_grads(row_grads, chunk):
    chunk_weight, chunk_bias, start = chunk

    def block_grads(i, carry):
      row_grads, weight_grad, bias_grad = carry
      block = row_blocks[i]
      probs = jnp.exp(block @ chunk_weight.T + chunk_bias - lse_blocks[i][..., None])
      is_label = label_blocks[i][..., None] == start + jnp.arange(size, dtype=jnp.int32)
      logit_grads = grad_blocks[i][..., None] * (probs - is_label.astype(jnp.float32))
      row_grads = row_grads.at[i].add(logit_grads @ chunk_weight)
      return (row_grads,
              weight_grad + jnp.einsum("nsc,nsd->cd", logit_grads, block,
                                       out_sharding=replicated),
              bias_grad + jnp.sum(logit_grads, axis=(0, 1)))

    zeros = (jnp.zeros((size, features), jnp.float32), jnp.zeros((size,), jnp.float32))
    row_grads, weight_grad, bias_grad = jax.lax.fori_loop(
        0, num_blocks, block_grads, (row_grads, *zeros))
    return row_grads, (weight_grad, bias_grad)

  row_grads, (weight_grads, bias_grads) = jax.lax.scan(
      chunk_grads, jnp.zeros_like(row_blocks), (weight_chunks, bias_chunks, starts))
  row_grads = row_grads.reshape((-1,) + rows.shape[1:])[:rows.shape[0]]
  weight_grads = weight_grads.reshape(-1, features)[:num_classes]
  bias_grads = bias_grads.reshape(-1)[:num_classes]
  return row_grads, weight_grads, bias_grads, None, None


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)
