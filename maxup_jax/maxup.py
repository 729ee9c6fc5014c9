r"""The MaxUp loss: train on the worst of `num_copies` random copies of each example.

MaxUp (Gong, Ren, Ye & Liu, 2020) replaces the usual augmented risk

.. math::
  \mathbb{E}_x \, \mathbb{E}_{x' \sim P(\cdot \mid x)} L(x', \theta)

by the expected worst case over m i.i.d. augmented copies

.. math::
  \mathbb{E}_x \max_{i<m} L(x'_i, \theta), \qquad x'_1, \dots, x'_m \sim P(\cdot \mid x).

The gradient of the max is the gradient of the arg-max copy (eq. 3 of the
paper), so the copies only have to be *compared*, never differentiated:
`maxup_loss` spends m forward passes without gradient to find the worst copy
of every example and one forward+backward pass on the winners.

Randomness is routed through per-example PRNG keys: `loss_fn` draws everything
random about example i (augmentation, dropout masks, noise) from `keys[i]`, so
re-evaluating the winning key reproduces the winning copy exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from maxup_jax import _checks, _sharding

Array = jax.Array
PyTree = Any
# loss_fn(params, batch, keys) -> losses [B]  or  (losses [B], aux)
LossFn = Callable[[PyTree, PyTree, Array], Any]

MODES = ("two_pass", "single_pass")


class MaxUpAux(NamedTuple):
  """What `maxup_loss` returns beside the scalar loss.

  Attributes:
    copy_losses: `[num_copies, B]` loss of every copy of every example, without
      gradient. In `two_pass` mode these are the selection-pass values.
    selected_copy: `[B]` int32 index of the worst copy of each example.
    loss_aux: the auxiliary output of `loss_fn` (when `has_aux=True`, else
      `None`) from the pass that carries the gradient. In `two_pass` mode that
      is the single pass over the winning copies, so its values (new BatchNorm
      statistics, carried RNN state, ...) are those of the winners; the
      selection passes' aux is discarded. In `single_pass` mode every copy
      carries gradient and each leaf has a leading `num_copies` axis.
  """

  copy_losses: Array
  selected_copy: Array
  loss_aux: Any


def maxup_loss(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    key: Array,
    num_copies: int,
    *,
    has_aux: bool = False,
    mode: Literal["two_pass", "single_pass"] = "two_pass",
    selection_loss_fn: LossFn | None = None,
    copies_per_pass: int = 1,
) -> tuple[Array, MaxUpAux]:
  r"""Mean over the batch of the worst-copy loss of each example.

  .. math::
    \ell(\theta) = \frac{1}{B} \sum_{b<B} \max_{i<m} L(x'_{i,b}, \theta),
    \qquad x'_{i,b} \sim P(\cdot \mid x_b)

  The key is split into `num_copies * B` per-example keys laid out
  `[num_copies, B]`; copy i of example b is the one `loss_fn` produces from
  `keys[i, b]`. With `num_copies=1` this is exactly standard augmentation:
  `loss_fn(params, batch, jax.random.split(key, B)).mean()`, same value, same
  gradient, same keys.

  Modes:
    `"two_pass"` (default): `loss_fn` evaluates every copy with
      `stop_gradient` parameters, giving `[num_copies, B]` losses; the
      per-example argmax picks each example's worst key, and `loss_fn` runs
      once more, with gradient, on the winning keys. A gradient costs m
      forward passes plus one forward+backward, as in the paper. If the loss
      of one example depends on the others (BatchNorm in training mode), the
      gradient pass sees the winners' batch statistics rather than each
      copy's, so its values can differ slightly from the selection's.
    `"single_pass"`: every copy is evaluated with gradient; the max is a
      gather at `stop_gradient(argmax)`. A gradient costs m forward+backward
      passes, and the loss differentiated is exactly the one maximised, also
      with batch-dependent layers.

  Passes and devices: each call of `loss_fn` sees the whole batch with one
  key per example, `copies_per_pass` copies at a time. With the default of
  one copy per pass, the copies are evaluated in sequence (`jax.lax.map`),
  so every pass is an ordinary call of `loss_fn` on `B` examples: under
  `jax.jit` with the batch sharded over a mesh, XLA partitions each pass like
  the loss it wraps, and each device evaluates only its own examples'
  copies, with no annotation (the keys follow the batch's sharding, also in
  explicit sharding mode). `copies_per_pass=k > 1` vmaps the model over `k`
  copies in each pass, `k * B` examples at once: faster on a single device
  when `B` alone underuses it (small batches, recurrent models), at `k`
  times the working set. A vmapped convolution merges the copy axis into
  the batch axis ahead of the examples, which a partitioner cannot split
  along a sharded batch, so with convolutions every device then computes
  the `k` copies of the global batch; keep one copy per pass when the batch
  is sharded. Under `shard_map` or `pmap` each device calls `maxup_loss` on
  its own examples: give each device its own key (e.g.
  `jax.random.fold_in(key, jax.lax.axis_index(axis))`).

  Args:
    loss_fn: `loss_fn(params, batch, keys)` with `keys` of shape `[B]` (one
      key per example) returning per-example losses `[B]`, or
      `(losses [B], aux)` if `has_aux`. It must be a pure function of its
      arguments; it is traced several times.
    params: the pytree that is differentiated (anything `jax.grad` accepts).
    batch: a pytree of arrays sharing the leading batch dimension `B`.
    key: a single PRNG key: a typed key (`jax.random.key`, shape `()`) or a
      raw `uint32` key (`jax.random.PRNGKey`); per-example keys are of the
      same kind.
    num_copies: m >= 1, the number of augmented copies per example.
    has_aux: whether `loss_fn` returns `(losses, aux)`.
    mode: `"two_pass"` or `"single_pass"`, see above.
    selection_loss_fn: `two_pass` only: the loss that ranks the copies in the
      selection passes, with `loss_fn`'s signature and return convention
      (default `loss_fn`). It must build the same copy from the same key; use
      it to select with a cheaper variant of the model, e.g. one computing in
      bfloat16 while the gradient pass stays in float32. `aux.copy_losses`
      then holds its values.
    copies_per_pass: k >= 1, the copies one pass evaluates (vmapped when
      k > 1): `ceil(m / k)` passes run in sequence; `k >= m` evaluates all
      copies in one vmapped pass. The losses are the same for every k.

  Returns:
    `(loss, aux)`: the scalar mean worst-copy loss, differentiable in
    `params`, and a `MaxUpAux`.

  Raises:
    TypeError: at trace time, for a `num_copies` or key of the wrong type, or
      a `loss_fn` returning the wrong structure or non-floating losses.
    ValueError: at trace time, for a bad `num_copies`, `mode` or
      `copies_per_pass`, a batch without a common leading dimension, a loss
      of the wrong shape, or `copies_per_pass > 1` on a batch sharded under
      explicit sharding.
  """
  _checks.check_int("num_copies", num_copies, 1, numpy=False, must_be=">= 1",
                    reason="it fixes array shapes, so it cannot be traced")
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if selection_loss_fn is not None and mode != "two_pass":
    raise ValueError(
        f"selection_loss_fn is only used by mode='two_pass' (single_pass "
        f"differentiates the selection itself); got mode={mode!r}.")
  _checks.check_int(
      "copies_per_pass", copies_per_pass, 1, numpy=False, wrong_type=ValueError,
      reason="num_copies or more evaluates all copies in one vmapped pass")
  _check_key(key)
  batch_size = _batch_size(batch)

  keys = jax.random.split(key, num_copies * batch_size)
  keys = keys.reshape((num_copies, batch_size) + keys.shape[1:])
  # Under explicit sharding, each example's keys must live where the example does.
  batch_axes = _sharding.explicit_batch_axes(jax.tree.leaves(batch)[0])
  if batch_axes is not None and 1 < copies_per_pass and num_copies > 1:
    raise ValueError(
        f"copies_per_pass={copies_per_pass} vmaps copies together, which cannot be split "
        f"along a batch sharded over mesh axes {batch_axes!r} (explicit sharding); "
        "use copies_per_pass=1, which partitions like the loss itself.")
  keys = _sharding.shard_axis_like(keys, 1, batch_axes)
  call = _checked_loss_fn(loss_fn, has_aux, batch_size)

  if num_copies == 1:
    # Plain augmentation: nothing to select, so no selection pass is spent.
    worst, loss_aux = call(params, batch, keys[0])
    selected = jnp.zeros((batch_size,), jnp.int32)
    copy_losses = jax.lax.stop_gradient(worst)[None]
    if mode == "single_pass":
      loss_aux = jax.tree.map(lambda leaf: leaf[None], loss_aux)
  elif mode == "single_pass":
    losses, loss_aux = _every_copy(call, params, batch, keys, copies_per_pass)
    selected = jnp.argmax(jax.lax.stop_gradient(losses), axis=0)
    worst = jnp.take_along_axis(losses, selected[None], axis=0)[0]
    copy_losses = jax.lax.stop_gradient(losses)
  else:
    select = call if selection_loss_fn is None else _checked_loss_fn(
        selection_loss_fn, has_aux, batch_size)
    copy_losses, _ = _every_copy(
        select, jax.lax.stop_gradient(params), batch, keys, copies_per_pass)
    copy_losses = jax.lax.stop_gradient(copy_losses)
    selected = jnp.argmax(copy_losses, axis=0)
    worst, loss_aux = call(params, batch, _take_copy(keys, selected))

  aux = MaxUpAux(
      copy_losses=copy_losses,
      selected_copy=selected.astype(jnp.int32),
      loss_aux=loss_aux if has_aux else None,
  )
  return jnp.mean(worst), aux


def _every_copy(call, params, batch, keys, copies_per_pass: int):
  """`call` on every copy: losses `[m, B]` and aux with a leading `m` axis."""
  num_copies = keys.shape[0]
  if copies_per_pass >= num_copies:
    return jax.vmap(call, in_axes=(None, None, 0))(params, batch, keys)
  per_copy = lambda copy_keys: call(params, batch, copy_keys)
  if copies_per_pass == 1:
    # A loop whose every iteration is one ordinary call of the loss on the
    # whole batch: it partitions exactly as the wrapped loss does.
    return jax.lax.map(per_copy, keys)
  return jax.lax.map(per_copy, keys, batch_size=copies_per_pass)


def _take_copy(keys: Array, selected: Array) -> Array:
  """`keys[selected[b], b]` for every example b: the winning copy's key."""
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    data = _take_copy(jax.random.key_data(keys), selected)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(keys))
  index = selected.reshape(selected.shape + (1,) * (keys.ndim - 2))
  return jnp.take_along_axis(keys, index[None], axis=0)[0]


def _check_key(key) -> None:
  if not hasattr(key, "dtype") or not hasattr(key, "shape"):
    raise TypeError(f"key must be a JAX PRNG key, got {type(key).__name__}.")
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(
          f"key must be a single PRNG key of shape (), got a key array of shape "
          f"{key.shape}; maxup_loss splits it into per-example keys itself."
      )
  elif key.dtype != jnp.uint32 or key.ndim != 1:
    raise ValueError(
        "key must be a single PRNG key: jax.random.key(seed) (shape ()) or "
        f"jax.random.PRNGKey(seed) (uint32, shape (2,)); got dtype {key.dtype} "
        f"and shape {key.shape}."
    )


def _batch_size(batch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch must be a pytree holding at least one array.")
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    shapes = jax.tree.map(jnp.shape, batch)
    raise ValueError(
        "every array in batch must share the leading batch dimension B; got "
        f"shapes {shapes}."
    )
  (batch_size,) = sizes
  if batch_size == 0:
    raise ValueError("batch is empty (B = 0).")
  return batch_size


def _checked_loss_fn(loss_fn: LossFn, has_aux: bool, batch_size: int):
  """Wraps `loss_fn` to always return `(losses, aux)` after checking its shape."""

  def call(params, batch, keys):
    out = loss_fn(params, batch, keys)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "with has_aux=True, loss_fn must return (per_example_losses, aux); "
            f"got {type(out).__name__}."
        )
      losses, aux = out
    else:
      if isinstance(out, tuple):
        raise TypeError(
            "loss_fn returned a tuple; pass has_aux=True if it returns "
            "(per_example_losses, aux)."
        )
      losses, aux = out, None
    if jnp.shape(losses) != (batch_size,):
      raise ValueError(
          f"loss_fn must return one loss per example, shape ({batch_size},), "
          f"got shape {jnp.shape(losses)}. Reduce over everything but the batch "
          "axis, and do not take the mean over the batch."
      )
    if not jnp.issubdtype(jnp.result_type(losses), jnp.floating):
      raise TypeError(
          f"loss_fn must return floating-point losses, got {jnp.result_type(losses)}."
      )
    return losses, aux

  return call
