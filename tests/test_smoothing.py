"""Tests of randomized smoothing: bounds, CERTIFY, PREDICT, counting, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from maxup_jax import smoothing

# ----------------------------------------------------------------------------
# Clopper-Pearson lower bound.


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_lower_bound_all_successes_is_alpha_root(n, alpha):
  # P(Binom(n, p) >= n) = p^n = alpha  =>  p = alpha^(1/n).
  np.testing.assert_allclose(smoothing.lower_confidence_bound(n, n, alpha), alpha**(1 / n),
                             rtol=1e-12)


@pytest.mark.parametrize("k,n", [(1, 1), (1, 10), (5, 10), (9, 10), (30, 40), (700, 1000),
                                 (99_000, 100_000)])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.2])
def test_lower_bound_solves_binomial_tail_equation(k, n, alpha):
  p = smoothing.lower_confidence_bound(k, n, alpha)
  assert 0.0 < p < k / n
  # The bound is the p at which observing k or more successes has probability alpha.
  np.testing.assert_allclose(stats.binom.sf(k - 1, n, p), alpha, rtol=1e-7)


@pytest.mark.parametrize("k,n", [(1, 3), (4, 7), (12, 20)])
def test_lower_bound_matches_exact_tail_sum(k, n):
  alpha = 0.001
  p = smoothing.lower_confidence_bound(k, n, alpha)
  tail = sum(math.comb(n, j) * p**j * (1 - p)**(n - j) for j in range(k, n + 1))
  np.testing.assert_allclose(tail, alpha, rtol=1e-9)


def test_lower_bound_is_zero_without_successes():
  assert smoothing.lower_confidence_bound(0, 50, 0.001) == 0.0


def test_lower_bound_grows_with_successes():
  bounds = [smoothing.lower_confidence_bound(k, 100, 0.001) for k in range(101)]
  assert np.all(np.diff(bounds) > 0)


@pytest.mark.parametrize("k,n,alpha,match", [
    (3, 2, 0.01, "num_successes"),
    (-1, 2, 0.01, "num_successes"),
    (1, 0, 0.01, "num_trials"),
    (1, 2, 0.0, "alpha"),
    (1, 2, 1.0, "alpha"),
])
def test_lower_bound_rejects_bad_input(k, n, alpha, match):
  with pytest.raises(ValueError, match=match):
    smoothing.lower_confidence_bound(k, n, alpha)


# ----------------------------------------------------------------------------
# Decisions from counts.


def test_certify_from_counts_radius_and_abstention():
  sigma, alpha = 0.5, 0.001
  result = smoothing.certify_from_counts([3, 90, 7], [100, 9000, 900], sigma, alpha)
  p_lower = stats.beta.ppf(alpha, 9000, 10_000 - 9000 + 1)
  assert result.prediction == 1
  assert result.count_top == 9000
  np.testing.assert_allclose(result.p_lower, p_lower, rtol=1e-12)
  np.testing.assert_allclose(result.radius, sigma * stats.norm.ppf(p_lower), rtol=1e-12)

  # Selection picks class 0 but estimation gives it only ~half: abstain.
  result = smoothing.certify_from_counts([60, 40], [5000, 5000], sigma, alpha)
  assert (result.prediction, result.radius) == (smoothing.ABSTAIN, 0.0)
  assert result.p_lower < 0.5


def test_certify_from_counts_uses_selection_class_even_if_estimation_disagrees():
  # c_A comes from the selection counts only; its estimation count may be small.
  result = smoothing.certify_from_counts([10, 0], [1, 999], 1.0, 0.001)
  assert result.prediction == smoothing.ABSTAIN
  assert result.count_top == 1


def test_predict_from_counts():
  confident = smoothing.predict_from_counts([2, 950, 48], alpha=0.001)
  assert confident.prediction == 1
  np.testing.assert_allclose(confident.p_value, stats.binomtest(950, 998, 0.5).pvalue)
  tied = smoothing.predict_from_counts([500, 490, 10], alpha=0.001)
  assert tied.prediction == smoothing.ABSTAIN


def test_certified_accuracy_hand_made():
  #              correct, radius
  # img 0: yes, 0.30  -> counts at r <= 0.30
  # img 1: yes, 1.00  -> counts at r <= 1.00
  # img 2: no,  2.00  (wrong class, however robust)
  # img 3: no,  0.00  (abstained)
  # img 4: yes, 0.00  (p_lower exactly 1/2: certified at r = 0 only)
  radii = np.array([0.30, 1.00, 2.00, 0.0, 0.0])
  correct = np.array([True, True, False, False, True])
  acc = smoothing.certified_accuracy(radii, correct, [0.0, 0.25, 0.3, 0.5, 1.0, 1.5, 2.5])
  np.testing.assert_allclose(acc, [3 / 5, 2 / 5, 2 / 5, 1 / 5, 1 / 5, 0, 0])


def test_certified_accuracy_default_thresholds_are_the_paper_radii():
  assert smoothing.PAPER_RADII == tuple(0.25 * i for i in range(1, 12))
  acc = smoothing.certified_accuracy(np.array([0.6]), np.array([1]))
  np.testing.assert_array_equal(acc, [1, 1] + [0] * 9)


def test_certified_accuracy_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="shape"):
    smoothing.certified_accuracy(np.zeros(3), np.zeros(2, bool), [0.5])


# ----------------------------------------------------------------------------
# A binary linear classifier, whose smoothed certified radius is known exactly.


class LinearClassifier:
  """f(x) = argmax(W x + b) with 2 classes.

  f(x + e) = 0 iff w.(x + e) + c > 0 with w = W[0] - W[1], c = b[0] - b[1], and
  w.e ~ N(0, sigma^2 |w|^2), so p_A = Phi(|w.x + c| / (sigma |w|)) and the
  smoothed classifier's exact radius sigma Phi^{-1}(p_A) is the distance
  |w.x + c| / |w| to the decision boundary.
  """

  def __init__(self, dim, seed):
    rng = np.random.default_rng(seed)
    self.weights = rng.normal(size=(2, dim)).astype(np.float32)
    self.bias = rng.normal(size=(2,)).astype(np.float32)
    self.w = (self.weights[0] - self.weights[1]).astype(np.float64)
    self.c = float(self.bias[0] - self.bias[1])

  def __call__(self, x):
    return x @ jnp.asarray(self.weights).T + jnp.asarray(self.bias)

  def signed_distance(self, x):
    return (np.asarray(x, np.float64) @ self.w + self.c) / np.linalg.norm(self.w)

  def point_at_distance(self, rng, distance):
    """A random point whose signed distance to the boundary is `distance`."""
    x = rng.normal(size=self.w.shape)
    x += (distance - self.signed_distance(x)) * self.w / np.linalg.norm(self.w)
    return x.astype(np.float32)


def test_certified_radius_never_exceeds_exact_radius():
  sigma, n0, n, alpha = 0.5, 100, 2000, 0.001
  rng = np.random.default_rng(0)
  num_certified = 0
  for dim in range(2, 11):
    classifier = LinearClassifier(dim, seed=dim)
    for j in range(6):
      distance = rng.uniform(-2.0, 2.0)
      x = classifier.point_at_distance(rng, distance)
      distance = classifier.signed_distance(x)  # exact for the float32 point
      result = smoothing.certify(classifier, jnp.asarray(x), jax.random.key(100 * dim + j),
                                 sigma, 2, n0=n0, n=n, alpha=alpha, batch_size=1000)
      if result.prediction == smoothing.ABSTAIN:
        assert result.radius == 0.0
        continue
      num_certified += 1
      assert result.prediction == (0 if distance > 0 else 1)
      assert 0.0 <= result.radius <= abs(distance)
  assert num_certified >= 30  # most random points are far enough to certify


@pytest.mark.parametrize("distance_over_sigma", [1.0, 1.5, 2.0])
def test_certified_radius_is_close_to_exact_for_large_n(distance_over_sigma):
  sigma = 0.5
  classifier = LinearClassifier(dim=10, seed=3)
  x = classifier.point_at_distance(np.random.default_rng(1), -distance_over_sigma * sigma)
  distance = abs(classifier.signed_distance(x))
  result = smoothing.certify(classifier, jnp.asarray(x), jax.random.key(7), sigma, 2,
                             n0=100, n=100_000, alpha=0.001, batch_size=10_000)
  assert result.prediction == 1
  # The estimate of p_A agrees with Phi(distance / sigma) to sampling accuracy.
  p_exact = stats.norm.cdf(distance / sigma)
  p_hat = result.count_top / 100_000
  assert abs(p_hat - p_exact) < 4 * math.sqrt(p_exact * (1 - p_exact) / 100_000)
  # The certified radius is a sound, tight under-estimate.
  assert 0.95 * distance < result.radius <= distance


def test_predict_abstains_on_boundary_and_not_far_from_it():
  classifier = LinearClassifier(dim=5, seed=11)
  rng = np.random.default_rng(2)
  on_boundary = classifier.point_at_distance(rng, 0.0)
  far = classifier.point_at_distance(rng, 1.5)
  kwargs = dict(sigma=0.5, num_classes=2, n=1000, alpha=0.001, batch_size=500)
  assert smoothing.predict(classifier, on_boundary, jax.random.key(0), **kwargs).prediction == -1
  assert smoothing.predict(classifier, far, jax.random.key(0), **kwargs).prediction == 0


# ----------------------------------------------------------------------------
# Counting, compilation and sharding.


def constant_classifier(x):
  """Always class 2 of 4."""
  return jnp.broadcast_to(jnp.array([0.0, 1.0, 3.0, 2.0]), (x.shape[0], 4))


@pytest.mark.parametrize("num_samples", [1, 499, 500, 501, 1234])
def test_counts_cover_exactly_num_samples(num_samples):
  counts = smoothing.sample_counts(constant_classifier, jnp.zeros((3,)), jax.random.key(0),
                                   sigma=1.0, num_samples=num_samples, batch_size=500,
                                   num_classes=4)
  np.testing.assert_array_equal(counts, [0, 0, num_samples, 0])
  assert counts.dtype == np.int64


def test_noise_is_gaussian_with_scale_sigma():
  # Class 1 iff the first noisy coordinate is positive: P = Phi(x0 / sigma).
  def sign_classifier(x):
    return jnp.stack([-x[:, 0], x[:, 0]], axis=-1)

  sigma, x0, num = 0.3, 0.15, 20_000
  counts = smoothing.sample_counts(sign_classifier, jnp.array([x0, 0.0]), jax.random.key(3),
                                   sigma, num, batch_size=5000, num_classes=2)
  p = stats.norm.cdf(x0 / sigma)
  assert abs(counts[1] / num - p) < 4 * math.sqrt(p * (1 - p) / num)


def test_certify_uses_independent_selection_and_estimation_keys():
  classifier = LinearClassifier(dim=3, seed=0)
  x = classifier.point_at_distance(np.random.default_rng(0), 0.1)
  key = jax.random.key(5)
  result = smoothing.certify(classifier, x, key, 0.5, 2, n0=300, n=300, batch_size=100)
  selection_key, estimation_key = jax.random.split(key)
  kwargs = dict(sigma=0.5, num_samples=300, batch_size=100, num_classes=2)
  np.testing.assert_array_equal(result.counts_selection,
                                smoothing.sample_counts(classifier, x, selection_key, **kwargs))
  np.testing.assert_array_equal(result.counts_estimation,
                                smoothing.sample_counts(classifier, x, estimation_key, **kwargs))
  # Same n, different keys: the two draws differ.
  assert not np.array_equal(result.counts_selection, result.counts_estimation)


def test_counting_compiles_once_across_images_and_settings():
  traces = []

  def classify(x):
    traces.append(x.shape)  # runs only while tracing
    return jnp.stack([x.sum(-1), -x.sum(-1), x[:, 0]], axis=-1)

  rng = np.random.default_rng(0)
  for i in range(5):
    x = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    smoothing.certify(classify, x, jax.random.key(i), sigma=0.25 * (i + 1), num_classes=3,
                      n0=10 + i, n=200 + 37 * i, batch_size=64)
    smoothing.predict(classify, x, jax.random.key(i), 0.5, 3, n=100, batch_size=64)
  assert len(traces) == 1

  counter = smoothing.make_counter(classify, num_classes=3, batch_size=64)
  for i in range(3):
    counter(jnp.full((4,), float(i)), jax.random.key(i), sigma=0.1, num_samples=100 + i)
  assert len(traces) == 2  # one more trace for the new counter, none per image
  if hasattr(counter.step, "_cache_size"):
    assert counter.step._cache_size() == 1


def test_sharded_counts_equal_unsharded_counts():
  if jax.device_count() < 2:
    pytest.skip("needs several devices (tests/conftest.py simulates 4 CPU devices)")
  classifier = LinearClassifier(dim=6, seed=4)
  x = classifier.point_at_distance(np.random.default_rng(3), 0.2)
  sharding = smoothing.data_sharding()
  batch_size = 64 * jax.device_count()
  args = (classifier, x, jax.random.key(9), 0.5, 1000, batch_size, 2)
  sharded = smoothing.sample_counts(*args, sharding=sharding)
  np.testing.assert_array_equal(sharded, smoothing.sample_counts(*args))
  # A Mesh works as well as a NamedSharding.
  np.testing.assert_array_equal(sharded, smoothing.sample_counts(*args, sharding=sharding.mesh))
  result = smoothing.certify(classifier, x, jax.random.key(9), 0.5, 2, n0=50, n=1000,
                             batch_size=batch_size, sharding=sharding)
  assert result.counts_estimation.sum() == 1000


def test_sharding_rejects_batch_not_divisible_by_devices():
  if jax.device_count() < 2:
    pytest.skip("needs several devices")
  with pytest.raises(ValueError, match="divisible"):
    smoothing.make_counter(constant_classifier, 4, jax.device_count() + 1,
                           sharding=smoothing.data_sharding())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sigma=0.0), ValueError, "sigma"),
    (dict(sigma=-1.0), ValueError, "sigma"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(n0=0), ValueError, "n0"),
    (dict(n=0), ValueError, "n"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(num_classes=1), ValueError, "num_classes"),
    (dict(num_classes=3), ValueError, "logits"),
    (dict(x=jnp.zeros((3,), jnp.int32)), TypeError, "floating"),
])
def test_certify_rejects_bad_input(kwargs, error, match):
  args = dict(classify_fn=constant_classifier, x=jnp.zeros((3,)), key=jax.random.key(0),
              sigma=0.5, num_classes=4, n0=10, n=10, alpha=0.001, batch_size=8)
  args.update(kwargs)
  with pytest.raises(error, match=match):
    smoothing.certify(**args)
