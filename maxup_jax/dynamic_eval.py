r"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals, 2018) of sequence models.

A trained model is scored on a text segment by segment; after scoring a
segment it takes one gradient step on that segment's loss, so it adapts to
the recent history of the text it is reading. The step is "SGD with an RMS
global prior": an RMS-normalised gradient step plus a decay towards the
trained weights theta_0,

.. math::
  \theta \leftarrow \theta - \eta \frac{\nabla L(\theta)}{\mathrm{MS} + \epsilon}
          + \lambda \, r \odot (\theta_0 - \theta),

where MS is the root-mean-square gradient of the trained model over training
segments, and the decay rate r = MS / mean(MS) (the mean over parameter
tensors of each tensor's mean RMS), clipped at 1 / lambda so the decay never
overshoots theta_0. This is the paper's equation; the hyper-parameters
eta, lambda, epsilon are those of the updated (not `--oldhyper`) reference code.

Everything here is a pure function of arrays; the scan over segments is one
`jax.lax.scan`, so it runs compiled end to end.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any
# segment_loss(params, carry, segment) -> (mean loss, (new_carry, nll_sum, num_tokens))
SegmentLossFn = Callable[[PyTree, PyTree, PyTree], tuple[Array, tuple[PyTree, Array, Array]]]


class GradientStats(NamedTuple):
  """Per-parameter gradient statistics of the trained model.

  Attributes:
    rms: sqrt(mean over training segments of grad^2), like the parameters.
    decay_rate: rms / (mean over tensors of mean(rms)), clipped at 1 / decay.
  """

  rms: PyTree
  decay_rate: PyTree


class DynamicEvalResult(NamedTuple):
  """Sums over the evaluated text and the adapted parameters after it."""

  nll_sum: Array
  num_tokens: Array
  params: PyTree


def gradient_stats(sum_squared_grads: PyTree, num_segments: Array | int,
                   decay: float) -> GradientStats:
  """RMS gradients and decay rates from summed squared gradients.

  Args:
    sum_squared_grads: sum over `num_segments` training segments of grad^2.
    num_segments: how many segments were summed.
    decay: lambda, the decay towards the trained weights; its inverse caps
      the decay rate.
  """
  if decay <= 0:
    raise ValueError(f"decay={decay}; must be > 0")
  rms = jax.tree.map(lambda s: jnp.sqrt(s / num_segments), sum_squared_grads)
  leaves = jax.tree.leaves(rms)
  global_mean = sum(jnp.mean(x) for x in leaves) / len(leaves)
  decay_rate = jax.tree.map(lambda x: jnp.minimum(x / global_mean, 1.0 / decay), rms)
  return GradientStats(rms=rms, decay_rate=decay_rate)


def collect_gradient_stats(segment_loss: SegmentLossFn, params: PyTree, carry: PyTree,
                           segments: PyTree, decay: float) -> GradientStats:
  """Accumulates squared gradients over training segments, carrying the state.

  Args:
    segment_loss: `(params, carry, segment) -> (loss, (carry, nll_sum, count))`
      without dropout.
    params: the trained parameters.
    carry: initial recurrent state.
    segments: a pytree whose leaves have a leading segment axis `[N, ...]`.
    decay: lambda (see `gradient_stats`).
  """
  grad_fn = jax.grad(segment_loss, has_aux=True)

  def step(acc, segment):
    sums, carry = acc
    grads, (carry, _, _) = grad_fn(params, carry, segment)
    sums = jax.tree.map(lambda s, g: s + jnp.square(g), sums, grads)
    return (sums, carry), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (sums, _), _ = jax.lax.scan(step, (zeros, carry), segments)
  num_segments = jax.tree.leaves(segments)[0].shape[0]
  return gradient_stats(sums, num_segments, decay)


def update(params: PyTree, grads: PyTree, trained_params: PyTree, stats: GradientStats, *,
           learning_rate: float, decay: float, epsilon: float) -> PyTree:
  """One dynamic-evaluation step: theta - eta g / (MS + eps) + lambda r (theta_0 - theta)."""
  return jax.tree.map(
      lambda p, g, p0, ms, r: p - learning_rate * g / (ms + epsilon) + decay * r * (p0 - p),
      params, grads, trained_params, stats.rms, stats.decay_rate)


def evaluate(segment_loss: SegmentLossFn, params: PyTree, carry: PyTree, segments: PyTree,
             stats: GradientStats, *, learning_rate: float, decay: float,
             epsilon: float) -> DynamicEvalResult:
  """Scores the segments in order, adapting the parameters after each one.

  Segment n is scored with the parameters adapted on segments 0..n-1, then
  the parameters take one `update` step on its loss; the recurrent state is
  carried through, computed by the same parameters that scored it.

  Args:
    segment_loss: `(params, carry, segment) -> (mean loss, (carry, nll_sum, count))`.
    params: the trained parameters theta_0.
    carry: initial recurrent state.
    segments: pytree with a leading segment axis `[N, ...]`, in text order.
    stats: from `collect_gradient_stats`.
    learning_rate: eta, the step size of `update`.
    decay: lambda, the decay towards the trained weights (as in `update`).
    epsilon: added to the RMS gradient in `update`'s denominator.

  Returns:
    A `DynamicEvalResult`; exp(nll_sum / num_tokens) is the perplexity.
  """
  grad_fn = jax.grad(segment_loss, has_aux=True)

  def step(acc, segment):
    current, carry, nll_sum, count = acc
    grads, (carry, seg_nll, seg_count) = grad_fn(current, carry, segment)
    current = update(current, grads, params, stats, learning_rate=learning_rate, decay=decay,
                     epsilon=epsilon)
    return (current, carry, nll_sum + seg_nll, count + seg_count), None

  init = (params, carry, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  (adapted, _, nll_sum, count), _ = jax.lax.scan(step, init, segments)
  return DynamicEvalResult(nll_sum=nll_sum, num_tokens=count, params=adapted)
