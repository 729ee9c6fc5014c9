"""Tests of the per-example cross-entropy and top-k metric."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from maxup_jax.losses import softmax_cross_entropy, topk_correct

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
