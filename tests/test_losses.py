"""Tests of the per-example cross-entropy and top-k metric."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from maxup_jax.losses import linear_softmax_cross_entropy, softmax_cross_entropy, topk_correct

BATCH, CLASSES = 6, 5


def _logits(dtype=jnp.float32):
  return (3.0 * jax.random.normal(jax.random.key(0), (BATCH, CLASSES))).astype(dtype)


def _labels():
  return jnp.array([0, 4, 2, 2, 1, 3], jnp.int32)


def _np_cross_entropy(logits, targets):
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -(np.asarray(targets, np.float64) * log_probs).sum(-1)


class SoftmaxCrossEntropyTest(parameterized.TestCase):

  @parameterized.parameters(jnp.int32, jnp.int8, jnp.uint8)
  def test_integer_labels(self, dtype):
    losses = softmax_cross_entropy(_logits(), _labels().astype(dtype))
    chex.assert_shape(losses, (BATCH,))
    expected = _np_cross_entropy(_logits(), np.eye(CLASSES)[_labels()])
    np.testing.assert_allclose(losses, expected, rtol=1e-5)

  def test_soft_labels(self):
    soft = jax.nn.softmax(jax.random.normal(jax.random.key(1), (BATCH, CLASSES)))
    losses = softmax_cross_entropy(_logits(), soft)
    np.testing.assert_allclose(losses, _np_cross_entropy(_logits(), soft), rtol=1e-5)

  def test_one_hot_labels_equal_integer_labels(self):
    chex.assert_trees_all_close(
        softmax_cross_entropy(_logits(), jax.nn.one_hot(_labels(), CLASSES)),
        softmax_cross_entropy(_logits(), _labels()),
        rtol=1e-5,
    )

  def test_extra_leading_axes(self):
    logits = _logits().reshape(2, 3, CLASSES)
    losses = softmax_cross_entropy(logits, _labels().reshape(2, 3))
    chex.assert_trees_all_close(
        losses.reshape(-1), softmax_cross_entropy(_logits(), _labels())
    )

  @parameterized.parameters("int", "soft")
  def test_bfloat16_logits_give_float32_losses(self, label_kind):
    logits = _logits(jnp.bfloat16)
    labels = _labels() if label_kind == "int" else jax.nn.one_hot(_labels(), CLASSES)
    if label_kind == "soft":
      labels = labels.astype(jnp.bfloat16)
    losses = softmax_cross_entropy(logits, labels)
    self.assertEqual(losses.dtype, jnp.float32)
    # Exact on the values the bfloat16 logits hold.
    expected = _np_cross_entropy(logits.astype(jnp.float32), np.eye(CLASSES)[_labels()])
    np.testing.assert_allclose(losses, expected, rtol=1e-5)

  def test_jit_matches_eager(self):
    soft = jax.nn.one_hot(_labels(), CLASSES)
    for labels in (_labels(), soft):
      chex.assert_trees_all_close(
          jax.jit(softmax_cross_entropy)(_logits(), labels),
          softmax_cross_entropy(_logits(), labels),
          rtol=1e-6,
      )

  def test_gradient_is_softmax_minus_target(self):
    grad = jax.grad(lambda z: softmax_cross_entropy(z, _labels()).sum())(_logits())
    expected = jax.nn.softmax(_logits()) - jax.nn.one_hot(_labels(), CLASSES)
    chex.assert_trees_all_close(grad, expected, atol=1e-6)

  def test_mismatched_integer_labels(self):
    with self.assertRaisesRegex(ValueError, r"integer labels must have shape \(6,\)"):
      softmax_cross_entropy(_logits(), _labels()[:4])

  def test_mismatched_soft_labels(self):
    with self.assertRaisesRegex(ValueError, r"soft labels must have the logits' shape"):
      softmax_cross_entropy(_logits(), jnp.ones((BATCH, CLASSES + 1)) / 6)

  def test_boolean_labels(self):
    with self.assertRaisesRegex(TypeError, "integer classes or floating-point"):
      softmax_cross_entropy(_logits(), jnp.ones((BATCH, CLASSES), bool))

  def test_integer_logits(self):
    with self.assertRaisesRegex(TypeError, "floating-point logits"):
      softmax_cross_entropy(jnp.ones((BATCH, CLASSES), jnp.int32), _labels())


class TopkCorrectTest(parameterized.TestCase):

  LOGITS = jnp.array([
      [5.0, 4.0, 3.0, 2.0, 1.0],
      [5.0, 4.0, 3.0, 2.0, 1.0],
      [5.0, 4.0, 3.0, 2.0, 1.0],
      [1.0, 2.0, 3.0, 4.0, 5.0],
  ])
  LABELS = jnp.array([0, 1, 4, 0])

  @parameterized.parameters(
      (1, [True, False, False, False]),
      (2, [True, True, False, False]),
      (4, [True, True, False, False]),
      (5, [True, True, True, True]),
  )
  def test_integer_labels(self, k, expected):
    correct = topk_correct(self.LOGITS, self.LABELS, k)
    np.testing.assert_array_equal(correct, expected)
    np.testing.assert_array_equal(jax.jit(topk_correct, static_argnums=2)(
        self.LOGITS, self.LABELS, k), expected)

  def test_soft_labels_use_their_argmax(self):
    soft = 0.6 * jax.nn.one_hot(self.LABELS, 5) + 0.4 * jax.nn.one_hot(
        jnp.array([3, 0, 0, 4]), 5
    )
    np.testing.assert_array_equal(
        topk_correct(self.LOGITS, soft, 2), topk_correct(self.LOGITS, self.LABELS, 2)
    )

  @parameterized.parameters(0, 6, 1.0, True)
  def test_bad_k(self, k):
    with self.assertRaisesRegex(ValueError, r"k must be a Python int in \[1, 5\]"):
      topk_correct(self.LOGITS, self.LABELS, k)

  def test_mismatched_labels(self):
    with self.assertRaisesRegex(ValueError, r"integer classes of shape \(4,\)"):
      topk_correct(self.LOGITS, self.LABELS[:3])


class LinearSoftmaxCrossEntropyTest(parameterized.TestCase):
  """The chunked output-layer loss against softmax_cross_entropy of the full logits."""

  ROWS, FEATURES, NUM_CLASSES = (3, 7), 5, 103  # 103 is prime: no chunk size divides it.

  def _problem(self):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=self.ROWS + (self.FEATURES,)).astype(np.float32)
    weight = 0.7 * rng.normal(size=(self.NUM_CLASSES, self.FEATURES)).astype(np.float32)
    bias = rng.normal(size=(self.NUM_CLASSES,)).astype(np.float32)
    labels = rng.integers(0, self.NUM_CLASSES, self.ROWS).astype(np.int32)
    # Row weights with zeros, as a padding mask gives them.
    row_weights = rng.uniform(size=self.ROWS).astype(np.float32) * (np.arange(self.ROWS[1]) < 5)
    return inputs, weight, bias, labels, row_weights

  # 21 rows in blocks of 4 (the last one padded): chunks of 10 (11 chunks, 7 padded classes) or
  # 16 (7 chunks of 15, 2 padded); in one block of 21 (fewer rows than row_block_size=128):
  # chunks widened from 1 to 6 (18 chunks, 5 padded) or one chunk of all 103; eager and jitted.
  @parameterized.parameters((1, 128, True), (10, 4, False), (16, 4, True), (500, 128, True))
  def test_values_and_gradients_equal_the_full_logits(self, chunk_size, row_block_size, jit):
    inputs, weight, bias, labels, row_weights = self._problem()

    def full(inputs, weight, bias):
      losses = softmax_cross_entropy(inputs @ weight.T + bias, labels)
      return jnp.sum(row_weights * losses), losses

    def chunked(inputs, weight, bias):
      losses = linear_softmax_cross_entropy(inputs, weight, bias, labels, chunk_size=chunk_size,
                                            row_block_size=row_block_size)
      return jnp.sum(row_weights * losses), losses

    grad = lambda f: jax.grad(f, argnums=(0, 1, 2), has_aux=True)
    chunked_grad = jax.jit(grad(chunked)) if jit else grad(chunked)
    (grads, losses), (expected_grads, expected_losses) = (
        chunked_grad(inputs, weight, bias), grad(full)(inputs, weight, bias))
    chex.assert_shape(losses, self.ROWS)
    chex.assert_trees_all_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-6)
    # Rows of weight 0 (padding) get no gradient.
    chex.assert_trees_all_equal(grads[0][:, 5:], jnp.zeros_like(grads[0][:, 5:]))

  @parameterized.parameters((9, False), (13, True), (0, True), (21, False))
  def test_rows_past_num_valid_rows_are_zero_and_get_no_gradient(self, num_valid, jit):
    inputs, weight, bias, labels, _ = self._problem()
    row_weights = np.random.default_rng(1).uniform(size=self.ROWS).astype(np.float32)

    def chunked(inputs, weight, bias):
      # Traced when jitted, as a segment's length is.
      losses = linear_softmax_cross_entropy(inputs, weight, bias, labels, chunk_size=16,
                                            row_block_size=4, num_valid_rows=num_valid)
      return jnp.sum(row_weights * losses), losses

    def full(inputs, weight, bias):
      valid = (np.arange(21) < num_valid).reshape(self.ROWS)
      losses = softmax_cross_entropy(inputs @ weight.T + bias, labels) * valid
      return jnp.sum(row_weights * losses), losses

    grad = lambda f: jax.grad(f, argnums=(0, 1, 2), has_aux=True)
    chunked_grad = jax.jit(grad(chunked)) if jit else grad(chunked)
    (grads, losses), (expected_grads, expected_losses) = (
        chunked_grad(inputs, weight, bias), grad(full)(inputs, weight, bias))
    chex.assert_trees_all_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-5, atol=1e-6)
    past = np.arange(21).reshape(self.ROWS) >= num_valid
    chex.assert_trees_all_equal(losses[past], jnp.zeros_like(losses[past]))
    chex.assert_trees_all_equal(grads[0][past], jnp.zeros_like(grads[0][past]))

  def test_vmapped_over_copies_equals_one_call_per_copy(self):
    inputs, weight, bias, labels, _ = self._problem()
    copies = jnp.stack([inputs, 2.0 * inputs])
    loss = functools.partial(linear_softmax_cross_entropy, chunk_size=16, row_block_size=8)
    batched = jax.jit(jax.vmap(loss, in_axes=(0, None, None, None)))(copies, weight, bias, labels)
    for copy, losses in zip(copies, batched):
      chex.assert_trees_all_close(losses, loss(copy, weight, bias, labels), rtol=1e-6)

  def test_large_logits_do_not_overflow(self):
    inputs, weight, bias, labels, _ = self._problem()
    bias = bias + np.float32(1e4)  # exp(1e4) overflows float32; the streaming log-sum-exp must not.
    losses = linear_softmax_cross_entropy(inputs, weight, bias, labels, chunk_size=16)
    expected = softmax_cross_entropy(inputs @ weight.T + bias, labels)
    chex.assert_tree_all_finite(losses)
    chex.assert_trees_all_close(losses, expected, rtol=1e-3, atol=1e-3)

  @parameterized.parameters(0, 2.0, True)
  def test_bad_chunk_size(self, chunk_size):
    inputs, weight, bias, labels, _ = self._problem()
    with self.assertRaisesRegex(ValueError, "chunk_size must be a Python int >= 1"):
      linear_softmax_cross_entropy(inputs, weight, bias, labels, chunk_size=chunk_size)
    with self.assertRaisesRegex(ValueError, "row_block_size must be a Python int >= 1"):
      linear_softmax_cross_entropy(inputs, weight, bias, labels, row_block_size=chunk_size)

  def test_mismatched_shapes(self):
    inputs, weight, bias, labels, _ = self._problem()
    with self.assertRaisesRegex(ValueError, r"weight \[K, D\]"):
      linear_softmax_cross_entropy(inputs, weight.T, bias, labels)
    with self.assertRaisesRegex(ValueError, r"labels must be integer classes of shape \(3, 7\)"):
      linear_softmax_cross_entropy(inputs, weight, bias, labels[:, :3])
