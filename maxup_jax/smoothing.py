r"""Randomized smoothing: CERTIFY and PREDICT of Cohen, Rosenfeld & Kolter (2019).

Given a base classifier f (here `classify_fn`, returning logits) and a noise
level sigma, the smoothed classifier is

.. math::
  g(x) = \operatorname*{argmax}_c \; P_{\varepsilon \sim N(0, \sigma^2 I)}
         \big[ f(x + \varepsilon) = c \big].

If the top class c_A has probability p_A >= 1/2 (Theorem 1 of Cohen et al.,
with p_B <= 1 - p_A), g is constant on the l2 ball of radius

.. math::
  R = \sigma \, \Phi^{-1}(p_A)

around x. `certify` estimates a one-sided (1 - alpha) lower bound on p_A by
Monte Carlo and returns the radius it implies; `predict` returns g(x) or
abstains. Both follow the reference implementation
(github.com/locuslab/smoothing, `code/core.py`) step for step, so numbers are
comparable with published certified accuracies (MaxUp, Gong et al. 2020,
Table 8).

The noise lives in the classifier's raw input space (e.g. [0, 1] pixels); a
classifier that standardises its input must do so itself, after the noise.

Sampling is done in fixed-size batches by one jitted step (noise, classify,
count) that is compiled once per (classify_fn, batch_size, input shape) and
reused across images; sigma, the number of samples and the key are runtime
arguments, so certifying a whole test set compiles exactly once. The batch can
be sharded over devices along a 'data' mesh axis; the class counts are then
summed across devices inside the jitted step.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import stats

from maxup_jax import _checks

Array = jax.Array
# classify_fn(noisy_inputs [b, *input_shape]) -> logits [b, num_classes]
ClassifyFn = Callable[[Array], Array]

ABSTAIN = -1
"""The prediction returned when the smoothed classifier abstains."""

PAPER_RADII = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75)
"""l2 radii at which MaxUp (Table 8) reports CIFAR-10 certified accuracy."""

DATA_AXIS = "data"
"""Mesh axis along which a noise batch is sharded."""

_MAX_SAMPLES = 2**31 - 1  # counts and sample indices are int32 on device.


class Certification(NamedTuple):
  """Result of `certify` for one input.

  Attributes:
    prediction: the certified class c_A, or `ABSTAIN` (-1).
    radius: certified l2 radius sigma * Phi^{-1}(p_A_lower); 0.0 on abstain.
    p_lower: the (1 - alpha) Clopper-Pearson lower bound on p_A.
    count_top: n_A, how many of the n estimation samples were classified c_A.
    counts_selection: `[K]` int64 class counts of the n0 selection samples.
    counts_estimation: `[K]` int64 class counts of the n estimation samples.
  """

  prediction: int
  radius: float
  p_lower: float
  count_top: int
  counts_selection: np.ndarray
  counts_estimation: np.ndarray


class Prediction(NamedTuple):
  """Result of `predict` for one input.

  Attributes:
    prediction: the top class, or `ABSTAIN` (-1) when the test fails.
    p_value: two-sided binomial test p-value of n_A against n_A + n_B at 1/2.
    counts: `[K]` int64 class counts of the n samples.
  """

  prediction: int
  p_value: float
  counts: np.ndarray


# ----------------------------------------------------------------------------
# Input checks.


def _check_sigma(sigma: Any) -> float:
  sigma = float(sigma)
  if not (math.isfinite(sigma) and sigma > 0):
    raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
  return sigma


def _check_alpha(alpha: Any) -> float:
  alpha = float(alpha)
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  return alpha


# ----------------------------------------------------------------------------
# Sharding.


def data_sharding(devices: Sequence[jax.Device] | None = None) -> NamedSharding:
  """A 1-D mesh over `devices` (default: all) that splits the batch axis.

  Args:
    devices: devices to spread the noise batch over; `jax.devices()` if None.

  Returns:
    `NamedSharding(Mesh(devices, ('data',)), PartitionSpec('data'))`.
  """
  devices = jax.devices() if devices is None else list(devices)
  return NamedSharding(Mesh(np.asarray(devices), (DATA_AXIS,)), PartitionSpec(DATA_AXIS))


def _batch_sharding(sharding: Mesh | NamedSharding) -> NamedSharding:
  """The sharding of a `[batch, ...]` noise batch: batch axis along 'data'."""
  if isinstance(sharding, Mesh):
    mesh = sharding
  elif isinstance(sharding, NamedSharding):
    mesh = sharding.mesh
  else:
    raise TypeError(
        "sharding must be a jax.sharding.Mesh or NamedSharding with a "
        f"{DATA_AXIS!r} axis, got {type(sharding).__name__}")
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(
        f"sharding's mesh must have a {DATA_AXIS!r} axis, got axes {mesh.axis_names}")
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


# ----------------------------------------------------------------------------
# Monte Carlo counting.


class NoiseCounter:
  """Counts f's argmax predictions on Gaussian perturbations of one input.

  Holds one jitted batch step::

    step(counts [K], x [*S], key, batch_index, num_samples, sigma) -> counts [K]

  which draws `batch_size` noise vectors e_j ~ N(0, sigma^2 I) from
  `fold_in(key, batch_index)`, classifies x + e_j and adds the one-hot argmax
  of the rows j with `batch_index * batch_size + j < num_samples` to `counts`.
  Every runtime quantity is an argument, so one compilation per input shape
  serves all images, sample counts and sigmas.

  Build it once per classifier (`make_counter`) and reuse it; `sample_counts`,
  `certify` and `predict` do this for you through a small cache keyed by the
  `classify_fn` object.
  """

  def __init__(
      self,
      classify_fn: ClassifyFn,
      num_classes: int,
      batch_size: int,
      sharding: Mesh | NamedSharding | None = None,
  ):
    """See `make_counter`."""
    if not callable(classify_fn):
      raise TypeError(f"classify_fn must be callable, got {classify_fn!r}")
    self.classify_fn = classify_fn
    self.num_classes = _checks.check_int("num_classes", num_classes, 2, _MAX_SAMPLES)
    self.batch_size = _checks.check_int("batch_size", batch_size, 1, _MAX_SAMPLES)
    self.sharding = sharding
    if sharding is None:
      self._noise_sharding = None
      self._replicated = None
    else:
      self._noise_sharding = _batch_sharding(sharding)
      mesh = self._noise_sharding.mesh
      num_shards = mesh.shape[DATA_AXIS]
      if self.batch_size % num_shards:
        raise ValueError(
            f"batch_size must be divisible by the number of devices along "
            f"{DATA_AXIS!r} ({num_shards}), got batch_size={batch_size}")
      self._replicated = NamedSharding(mesh, PartitionSpec())
    jit_kwargs = {} if self._replicated is None else {"out_shardings": self._replicated}
    self.step = jax.jit(self._step, **jit_kwargs)

  def _step(self, counts, x, key, batch_index, num_samples, sigma):
    """Adds the class counts of one masked noise batch to `counts` [K]."""
    batch_key = jax.random.fold_in(key, batch_index)
    noise = jax.random.normal(batch_key, (self.batch_size,) + x.shape, x.dtype)
    if self._noise_sharding is not None:
      # With partitionable threefry each device draws only its own shard, and
      # the draws do not depend on how the batch is split.
      noise = jax.lax.with_sharding_constraint(noise, self._noise_sharding)
    logits = self.classify_fn(x[None] + sigma.astype(x.dtype) * noise)
    expected = (self.batch_size, self.num_classes)
    if logits.shape != expected:
      raise ValueError(
          f"classify_fn must map [batch, *input_shape] to logits of shape "
          f"[batch, num_classes] = {expected}, got {logits.shape}")
    sample_index = batch_index * self.batch_size + jnp.arange(self.batch_size)
    valid = sample_index < num_samples
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), self.num_classes, dtype=jnp.int32)
    return counts + jnp.sum(one_hot * valid[:, None].astype(jnp.int32), axis=0)

  def __call__(self, x: Array, key: Array, sigma: float, num_samples: int) -> np.ndarray:
    """Class counts of f(x + e), e ~ N(0, sigma^2 I), over `num_samples` draws.

    Args:
      x: one input `[*input_shape]`, floating point, without a batch axis.
      key: PRNG key; batch i uses `fold_in(key, i)`.
      sigma: noise standard deviation, > 0.
      num_samples: number of noise draws, in [1, 2^31 - 1]; drawn in
        ceil(num_samples / batch_size) batches, the last one masked.

    Returns:
      `[num_classes]` int64 counts summing to `num_samples`.
    """
    sigma = _check_sigma(sigma)
    num_samples = _checks.check_int("num_samples", num_samples, 1, _MAX_SAMPLES)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"x must be floating point (the classifier's raw input), got {x.dtype}")
    counts = jnp.zeros((self.num_classes,), jnp.int32)
    if self._replicated is not None:
      x, key, counts = jax.device_put((x, key, counts), self._replicated)
    sigma_arr = jnp.asarray(sigma, jnp.float32)
    num_arr = jnp.asarray(num_samples, jnp.int32)
    # Dispatch is asynchronous: the host only waits at the final transfer.
    for batch_index in range(-(-num_samples // self.batch_size)):
      counts = self.step(counts, x, key, jnp.asarray(batch_index, jnp.int32), num_arr, sigma_arr)
    return np.asarray(jax.device_get(counts), dtype=np.int64)


def make_counter(
    classify_fn: ClassifyFn,
    num_classes: int,
    batch_size: int,
    sharding: Mesh | NamedSharding | None = None,
) -> NoiseCounter:
  """Builds the jitted Monte Carlo counter for one classifier.

  Args:
    classify_fn: `[b, *input_shape] -> [b, num_classes]` logits; traced once
      per input shape.
    num_classes: K >= 2.
    batch_size: noise samples per classifier call; with `sharding`, divisible
      by the number of devices along 'data'.
    sharding: optional `Mesh` or `NamedSharding` with a 'data' axis; the noise
      batch is split along it (see `data_sharding`).

  Returns:
    A `NoiseCounter`; call it as `counter(x, key, sigma, num_samples)`.
  """
  return NoiseCounter(classify_fn, num_classes, batch_size, sharding)


@functools.lru_cache(maxsize=8)
def _cached_counter_by_key(classify_fn, num_classes, batch_size, sharding) -> NoiseCounter:
  return make_counter(classify_fn, num_classes, batch_size, sharding)


def _cached_counter(classify_fn, num_classes, batch_size, sharding) -> NoiseCounter:
  """The counter for this classify_fn object, built on first use.

  Keyed by the classify_fn object itself: pass the same function (not a fresh
  lambda per image) to reuse the compiled step.
  """
  try:
    return _cached_counter_by_key(classify_fn, num_classes, batch_size, sharding)
  except TypeError:  # Unhashable classify_fn or sharding: build without caching.
    return make_counter(classify_fn, num_classes, batch_size, sharding)


def sample_counts(
    classify_fn: ClassifyFn,
    x: Array,
    key: Array,
    sigma: float,
    num_samples: int,
    batch_size: int,
    num_classes: int,
    sharding: Mesh | NamedSharding | None = None,
) -> np.ndarray:
  """Class counts of classify_fn(x + e), e ~ N(0, sigma^2 I), `num_samples` draws.

  Args:
    classify_fn: `[b, *input_shape] -> [b, num_classes]` logits.
    x: one input `[*input_shape]` (no batch axis), floating point.
    key: PRNG key.
    sigma: noise standard deviation, > 0.
    num_samples: number of draws, >= 1.
    batch_size: draws per classifier call (the only compiled batch shape).
    num_classes: K >= 2.
    sharding: optional `Mesh`/`NamedSharding` with a 'data' axis.

  Returns:
    `[num_classes]` int64 counts of argmax predictions, summing to num_samples.
  """
  counter = _cached_counter(classify_fn, num_classes, batch_size, sharding)
  return counter(x, key, sigma, num_samples)


# ----------------------------------------------------------------------------
# Statistics (host side, float64).


def lower_confidence_bound(num_successes: int, num_trials: int, alpha: float) -> float:
  """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.

  p_lower = Beta quantile B(alpha; k, n - k + 1), and 0 when k = 0. It is the
  p at which P(Binom(n, p) >= k) = alpha, so P(p_lower <= p) >= 1 - alpha for
  every true p. Equals `proportion_confint(k, n, 2 * alpha, 'beta')[0]` of
  statsmodels, as used by Cohen et al.

  Args:
    num_successes: k in [0, n].
    num_trials: n >= 1.
    alpha: failure probability in (0, 1).

  Returns:
    The lower bound, a float in [0, 1).
  """
  n = _checks.check_int("num_trials", num_trials, 1, 2**62)
  k = _checks.check_int("num_successes", num_successes, 0, n,
                        must_be=f"in [0, num_trials={n}]")
  alpha = _check_alpha(alpha)
  if k == 0:
    return 0.0
  return float(stats.beta.ppf(alpha, k, n - k + 1))


def certify_from_counts(
    counts_selection: np.ndarray,
    counts_estimation: np.ndarray,
    sigma: float,
    alpha: float,
) -> Certification:
  """CERTIFY's decision from the two (independent) sets of class counts.

  c_A = argmax counts_selection (first on ties), n_A = counts_estimation[c_A],
  p_lower = lower_confidence_bound(n_A, n, alpha) with n = sum(counts_estimation);
  abstain when p_lower < 1/2, else radius = sigma * Phi^{-1}(p_lower).

  Args:
    counts_selection: `[K]` counts of the n0 selection samples.
    counts_estimation: `[K]` counts of the n estimation samples.
    sigma: noise standard deviation, > 0.
    alpha: failure probability in (0, 1).

  Returns:
    A `Certification`.
  """
  sigma = _check_sigma(sigma)
  counts_selection = np.asarray(counts_selection, dtype=np.int64)
  counts_estimation = np.asarray(counts_estimation, dtype=np.int64)
  if counts_selection.ndim != 1 or counts_selection.shape != counts_estimation.shape:
    raise ValueError(
        "counts_selection and counts_estimation must both have shape [K], got "
        f"{counts_selection.shape} and {counts_estimation.shape}")
  top = int(np.argmax(counts_selection))
  count_top = int(counts_estimation[top])
  p_lower = lower_confidence_bound(count_top, int(counts_estimation.sum()), alpha)
  if p_lower < 0.5:
    prediction, radius = ABSTAIN, 0.0
  else:
    prediction, radius = top, sigma * float(stats.norm.ppf(p_lower))
  return Certification(prediction, radius, p_lower, count_top, counts_selection,
                       counts_estimation)


def predict_from_counts(counts: np.ndarray, alpha: float) -> Prediction:
  """PREDICT's decision from class counts (Hung & Fithian's top-class test).

  With n_A, n_B the two largest counts, abstain when the two-sided binomial
  test of n_A successes in n_A + n_B trials at p = 1/2 has p-value > alpha;
  otherwise return the top class (first on ties).

  Args:
    counts: `[K]` class counts, K >= 2, not all zero.
    alpha: failure probability in (0, 1).

  Returns:
    A `Prediction`.
  """
  alpha = _check_alpha(alpha)
  counts = np.asarray(counts, dtype=np.int64)
  if counts.ndim != 1 or counts.shape[0] < 2:
    raise ValueError(f"counts must have shape [K] with K >= 2, got {counts.shape}")
  if counts.sum() <= 0:
    raise ValueError("counts must contain at least one sample")
  order = np.argsort(-counts, kind="stable")
  count_a, count_b = int(counts[order[0]]), int(counts[order[1]])
  p_value = float(stats.binomtest(count_a, count_a + count_b, p=0.5).pvalue)
  prediction = ABSTAIN if p_value > alpha else int(order[0])
  return Prediction(prediction, p_value, counts)


# ----------------------------------------------------------------------------
# The two algorithms.


def certify(
    classify_fn: ClassifyFn,
    x: Array,
    key: Array,
    sigma: float,
    num_classes: int,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    sharding: Mesh | NamedSharding | None = None,
) -> Certification:
  """CERTIFY(f, sigma, x, n0, n, alpha) of Cohen et al. (2019), Algorithm 1.

  n0 noise samples select c_A; n fresh samples, from an independent key,
  estimate p_lower on P(f(x + e) = c_A). With probability >= 1 - alpha over
  the sampling, a non-abstaining result satisfies g(x + delta) = c_A for every
  ||delta||_2 < radius.

  Args:
    classify_fn: `[b, *input_shape] -> [b, num_classes]` logits. Pass the same
      object for every image so the jitted step is reused.
    x: one input `[*input_shape]`, floating point, in the classifier's raw
      input space.
    key: PRNG key; split into a selection key and an estimation key.
    sigma: noise standard deviation, > 0.
    num_classes: K >= 2.
    n0: selection samples, >= 1.
    n: estimation samples, >= 1.
    alpha: failure probability in (0, 1).
    batch_size: noise samples per classifier call.
    sharding: optional `Mesh`/`NamedSharding` with a 'data' axis.

  Returns:
    A `Certification` (prediction, radius, p_lower, count_top, counts...).
  """
  n0 = _checks.check_int("n0", n0, 1, _MAX_SAMPLES)
  n = _checks.check_int("n", n, 1, _MAX_SAMPLES)
  alpha = _check_alpha(alpha)
  counter = _cached_counter(classify_fn, num_classes, batch_size, sharding)
  selection_key, estimation_key = jax.random.split(key)
  counts_selection = counter(x, selection_key, sigma, n0)
  counts_estimation = counter(x, estimation_key, sigma, n)
  return certify_from_counts(counts_selection, counts_estimation, sigma, alpha)


def predict(
    classify_fn: ClassifyFn,
    x: Array,
    key: Array,
    sigma: float,
    num_classes: int,
    *,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    sharding: Mesh | NamedSharding | None = None,
) -> Prediction:
  """PREDICT(f, sigma, x, n, alpha) of Cohen et al. (2019), Algorithm 2.

  With probability >= 1 - alpha over the sampling, a non-abstaining prediction
  equals g(x).

  Args:
    classify_fn: `[b, *input_shape] -> [b, num_classes]` logits.
    x: one input `[*input_shape]`, floating point.
    key: PRNG key.
    sigma: noise standard deviation, > 0.
    num_classes: K >= 2.
    n: samples, >= 1.
    alpha: failure probability in (0, 1).
    batch_size: noise samples per classifier call.
    sharding: optional `Mesh`/`NamedSharding` with a 'data' axis.

  Returns:
    A `Prediction` (prediction or ABSTAIN, p_value, counts).
  """
  n = _checks.check_int("n", n, 1, _MAX_SAMPLES)
  alpha = _check_alpha(alpha)
  counts = sample_counts(classify_fn, x, key, sigma, n, batch_size, num_classes, sharding)
  return predict_from_counts(counts, alpha)


# ----------------------------------------------------------------------------
# Evaluation.


def certified_accuracy(
    radii: np.ndarray,
    correct: np.ndarray,
    thresholds: Sequence[float] = PAPER_RADII,
) -> np.ndarray:
  r"""Fraction of inputs certified correct at each radius threshold.

  .. math::
    \mathrm{acc}(r) = \frac{1}{N} \sum_{i<N}
        [\mathrm{correct}_i \text{ and } \mathrm{radius}_i \ge r]

  `correct_i` must already be false for abstentions (prediction -1 never equals
  a label), as in the certification logs.

  Args:
    radii: `[N]` certified radii (0 on abstain).
    correct: `[N]` bool or 0/1, prediction == label.
    thresholds: `[T]` radii r at which to evaluate.

  Returns:
    `[T]` float64 certified accuracies in [0, 1].
  """
  radii = np.asarray(radii, dtype=np.float64)
  correct = np.asarray(correct)
  thresholds = np.asarray(thresholds, dtype=np.float64)
  if radii.ndim != 1 or radii.shape != correct.shape:
    raise ValueError(
        f"radii and correct must both have shape [N], got {radii.shape} and {correct.shape}")
  if radii.size == 0:
    raise ValueError("certified_accuracy needs at least one input, got N=0")
  if thresholds.ndim != 1:
    raise ValueError(f"thresholds must have shape [T], got {thresholds.shape}")
  if not np.isin(correct, (0, 1)).all():
    raise ValueError("correct must be boolean or 0/1")
  certified = correct.astype(bool)[None, :] & (radii[None, :] >= thresholds[:, None])
  return certified.mean(axis=1)
