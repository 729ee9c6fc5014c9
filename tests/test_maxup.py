"""Tests of `maxup_loss`: selection, gradients, modes, transforms and errors."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from maxup_jax import maxup_loss

BATCH, DIM, CLASSES = 6, 5, 3


def _linear_params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
      "w": jax.random.normal(k1, (DIM, CLASSES)),
      "b": 0.1 * jax.random.normal(k2, (CLASSES,)),
  }


def _batch(seed=1):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {
      "x": jax.random.normal(kx, (BATCH, DIM)),
      "y": jax.random.randint(ky, (BATCH,), 0, CLASSES),
  }


def _noise(keys, sigma=0.5):
  return sigma * jax.vmap(lambda k: jax.random.normal(k, (DIM,)))(keys)


def _xent(logits, labels):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]


def noisy_linear_loss(params, batch, keys):
  """Cross-entropy of a linear classifier on Gaussian-perturbed inputs."""
  x = batch["x"] + _noise(keys)
  return _xent(x @ params["w"] + params["b"], batch["y"])


class SelectionTest(parameterized.TestCase):

  @parameterized.parameters("two_pass", "single_pass")
  def test_planted_worst_copy_is_selected_per_example(self, mode):
    # Copy c of example b has loss scores[c, b]; each example's worst copy
    # sits at a different index, so a per-batch max would get most wrong.
    num_copies = 4
    scores = jnp.array([
        [0.1, 9.0, 0.3, 0.2, 5.0, 0.0],
        [0.2, 0.1, 7.0, 0.3, 0.1, 0.0],
        [3.0, 0.2, 0.1, 0.4, 0.2, 0.0],
        [0.3, 0.3, 0.2, 8.0, 0.3, 4.0],
    ])
    key = jax.random.key(3)
    keys = jax.random.split(key, num_copies * BATCH).reshape(num_copies, BATCH)
    key_data = jax.random.key_data(keys)

    def planted_loss(params, batch, keys):
      # Identify which copy each key is, by comparing raw key bits.
      match = jnp.all(jax.random.key_data(keys)[None] == key_data, axis=-1)
      copy = jnp.argmax(match, axis=0)
      return params * scores[copy, jnp.arange(BATCH)] + 0.0 * batch["x"][:, 0]

    loss, aux = maxup_loss(planted_loss, 1.0, _batch(), key, num_copies, mode=mode)
    expected_copy = jnp.argmax(scores, axis=0)
    np.testing.assert_array_equal(aux.selected_copy, expected_copy)
    np.testing.assert_array_equal(expected_copy, [2, 0, 1, 3, 0, 3])
    chex.assert_trees_all_close(aux.copy_losses, scores)
    chex.assert_trees_all_close(loss, scores.max(0).mean())
    grad = jax.grad(lambda p: maxup_loss(planted_loss, p, _batch(), key, num_copies, mode=mode)[0])(1.0)
    chex.assert_trees_all_close(grad, scores.max(0).mean())

  @parameterized.parameters("two_pass", "single_pass")
  def test_gradient_equals_brute_force_worst_copy_gradient(self, mode):
    params, batch, key, num_copies = _linear_params(), _batch(), jax.random.key(7), 5
    keys = jax.random.split(key, num_copies * BATCH).reshape(num_copies, BATCH)

    # Brute force: loop over examples, evaluate each copy alone, differentiate
    # the worst copy of each example alone, average the gradients.
    def one_example_loss(p, b, k):
      return noisy_linear_loss(p, jax.tree.map(lambda a: a[b:b + 1], batch), k[None])[0]

    grads = []
    for b in range(BATCH):
      copy_losses = [one_example_loss(params, b, keys[c, b]) for c in range(num_copies)]
      worst = int(np.argmax(copy_losses))
      grads.append(jax.grad(one_example_loss)(params, b, keys[worst, b]))
    brute = jax.tree.map(lambda *g: sum(g) / BATCH, *grads)

    grad = jax.grad(lambda p: maxup_loss(noisy_linear_loss, p, batch, key, num_copies, mode=mode)[0])(params)
    chex.assert_trees_all_close(grad, brute, rtol=1e-5, atol=1e-6)

  def test_worst_copy_loss_is_max_of_copy_losses(self):
    loss, aux = maxup_loss(noisy_linear_loss, _linear_params(), _batch(), jax.random.key(0), 4)
    chex.assert_shape(aux.copy_losses, (4, BATCH))
    chex.assert_shape(aux.selected_copy, (BATCH,))
    chex.assert_type(aux.selected_copy, jnp.int32)
    chex.assert_trees_all_close(loss, aux.copy_losses.max(0).mean(), rtol=1e-6)
    assert aux.loss_aux is None


class ModesTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 4, 10)
  def test_two_pass_and_single_pass_agree_without_batch_dependence(self, num_copies):
    params, batch, key = _linear_params(), _batch(), jax.random.key(11)

    def run(mode):
      return jax.value_and_grad(
          lambda p: maxup_loss(noisy_linear_loss, p, batch, key, num_copies, mode=mode)[0]
      )(params)

    two_loss, two_grad = run("two_pass")
    one_loss, one_grad = run("single_pass")
    chex.assert_trees_all_close(two_loss, one_loss, rtol=1e-6)
    chex.assert_trees_all_close(two_grad, one_grad, rtol=1e-5, atol=1e-7)

  @parameterized.parameters("two_pass", "single_pass")
  def test_one_copy_is_plain_augmentation(self, mode):
    params, batch, key = _linear_params(), _batch(), jax.random.key(5)

    def plain(p):
      return noisy_linear_loss(p, batch, jax.random.split(key, BATCH)).mean()

    def maxup(p):
      return maxup_loss(noisy_linear_loss, p, batch, key, 1, mode=mode)[0]

    plain_loss, plain_grad = jax.value_and_grad(plain)(params)
    loss, grad = jax.value_and_grad(maxup)(params)
    # Same keys, same arithmetic: bit-identical, not merely close.
    np.testing.assert_array_equal(loss, plain_loss)
    chex.assert_trees_all_equal(grad, plain_grad)

  def test_two_pass_differentiates_only_the_winners(self):
    # A custom_vjp identity reveals how each trace of the loss is used: its
    # plain body runs when a pass is not differentiated, `fwd` when it is.
    traces = []

    @jax.custom_vjp
    def spy(x):
      traces.append("forward only")
      return x

    def spy_fwd(x):
      traces.append("differentiated")
      return x, None

    spy.defvjp(spy_fwd, lambda _, g: (g,))

    def spying_loss(params, batch, keys):
      return noisy_linear_loss({"w": spy(params["w"]), "b": params["b"]}, batch, keys)

    def grad(mode, copies_per_pass=1):
      traces.clear()
      jax.grad(lambda p: maxup_loss(spying_loss, p, _batch(), jax.random.key(0), 4, mode=mode,
                                    copies_per_pass=copies_per_pass)[0])(_linear_params())
      return list(traces)

    # m copies compared without gradient (one pass per copy, in a loop, or
    # all in one vmapped pass), then one differentiated pass over the B winners.
    assert grad("two_pass") == ["forward only", "differentiated"]
    assert grad("two_pass", copies_per_pass=4) == ["forward only", "differentiated"]
    assert grad("single_pass", copies_per_pass=4) == ["differentiated"]
    # The loop stages its body once (tracing the primal) before differentiating it.
    assert grad("single_pass").count("differentiated") == 1

  def test_raw_uint32_keys_are_passed_through_as_raw_keys(self):
    kinds = []

    def loss(params, batch, keys):
      kinds.append((keys.dtype, keys.shape))
      return noisy_linear_loss(params, batch, keys)

    raw_loss, _ = maxup_loss(loss, _linear_params(), _batch(), jax.random.PRNGKey(2), 3)
    assert all(dtype == jnp.uint32 and shape == (BATCH, 2) for dtype, shape in kinds), kinds
    typed_loss, _ = maxup_loss(noisy_linear_loss, _linear_params(), _batch(),
                               jax.random.wrap_key_data(jax.random.PRNGKey(2)), 3)
    chex.assert_trees_all_close(raw_loss, typed_loss)


class SmoothnessTheoremTest(parameterized.TestCase):
  """Theorem 1: E[max_i L(x + z_i)] = L(x) + c_{m,sigma} ||grad_x L(x)|| + O(sigma^2)."""

  @staticmethod
  def expected_max_of_normals(m):
    # E[max of m iid N(0,1)] = int x * m * phi(x) * Phi(x)^(m-1) dx.
    x = np.linspace(-12.0, 12.0, 200_001)
    phi = np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2)))
    return float(np.trapezoid(x * m * phi * cdf ** (m - 1), x))

  def test_expected_max_of_normals(self):
    # Known closed forms: m=2 -> 1/sqrt(pi), m=3 -> 3/(2 sqrt(pi)).
    assert abs(self.expected_max_of_normals(1)) < 1e-9
    assert abs(self.expected_max_of_normals(2) - 1 / math.sqrt(math.pi)) < 1e-7
    assert abs(self.expected_max_of_normals(3) - 1.5 / math.sqrt(math.pi)) < 1e-7

  @parameterized.parameters(2, 4, 10)
  def test_maxup_risk_adds_gradient_norm_penalty(self, num_copies):
    sigma, num_draws = 0.01, 100_000
    a = jnp.array([[0.8, -0.5, 0.3, 0.1], [0.2, 0.4, -0.7, 0.5], [-0.3, 0.1, 0.2, -0.9]])
    x0 = jnp.array([0.3, -0.2, 0.5, 0.1])

    def smooth_loss(x):
      return jnp.sum(jnp.log1p(jnp.exp(a @ x)))

    def perturbed_loss(params, batch, keys):
      z = sigma * jax.vmap(lambda k: jax.random.normal(k, x0.shape))(keys)
      return jax.vmap(smooth_loss)(batch + z)

    batch = jnp.broadcast_to(x0, (num_draws, x0.size))
    risk, aux = jax.jit(
        lambda b: maxup_loss(perturbed_loss, None, b, jax.random.key(0), num_copies)
    )(batch)
    clean = smooth_loss(x0)
    grad_norm = jnp.linalg.norm(jax.grad(smooth_loss)(x0))
    c = sigma * self.expected_max_of_normals(num_copies)

    # The first-order term of the max, in units of sigma * ||grad||, is
    # c_{m,sigma} / sigma = E[max of m standard normals].
    measured = float((risk - clean) / (sigma * grad_norm))
    predicted = c / sigma
    # Monte-Carlo error ~ 1/sqrt(num_draws); the O(sigma^2) term ~ sigma.
    assert abs(measured - predicted) < 0.03, (measured, predicted)
    # Averaging the copies (standard augmentation) has no first-order term.
    mean_term = float((aux.copy_losses.mean() - clean) / (sigma * grad_norm))
    assert abs(mean_term) < 0.03, mean_term
    assert predicted > 0.5


class TransformsTest(parameterized.TestCase):

  def _loss(self, params, mode="two_pass", key=jax.random.key(0)):
    return maxup_loss(noisy_linear_loss, params, _batch(), key, 3, mode=mode)

  @parameterized.parameters("two_pass", "single_pass")
  def test_jit_matches_eager(self, mode):
    params = _linear_params()
    eager_loss, eager_aux = self._loss(params, mode)
    jit_loss, jit_aux = jax.jit(lambda p: self._loss(p, mode))(params)
    chex.assert_trees_all_close(eager_loss, jit_loss, rtol=1e-6)
    np.testing.assert_array_equal(eager_aux.selected_copy, jit_aux.selected_copy)
    eager_grad = jax.grad(lambda p: self._loss(p, mode)[0])(params)
    jit_grad = jax.jit(jax.grad(lambda p: self._loss(p, mode)[0]))(params)
    chex.assert_trees_all_close(eager_grad, jit_grad, rtol=1e-5, atol=1e-7)

  def test_value_and_grad_with_aux(self):
    (loss, aux), grad = jax.value_and_grad(self._loss, has_aux=True)(_linear_params())
    chex.assert_rank(loss, 0)
    chex.assert_trees_all_equal_shapes(grad, _linear_params())
    assert aux.selected_copy.shape == (BATCH,)

  def test_vmap_over_parameter_ensemble(self):
    ensemble = jax.vmap(_linear_params)(jnp.arange(3))
    losses, aux = jax.vmap(self._loss)(ensemble)
    chex.assert_shape(losses, (3,))
    chex.assert_shape(aux.copy_losses, (3, 3, BATCH))
    for i in range(3):
      single = self._loss(jax.tree.map(lambda a: a[i], ensemble))[0]
      chex.assert_trees_all_close(losses[i], single, rtol=1e-6)

  def test_checkpoint(self):
    params = _linear_params()
    plain = jax.grad(lambda p: self._loss(p)[0])(params)
    remat = jax.grad(jax.checkpoint(lambda p: self._loss(p)[0]))(params)
    chex.assert_trees_all_close(plain, remat, rtol=1e-6)

  def test_shard_map_data_parallel_equals_global(self):
    devices = jax.devices()
    assert len(devices) == 4, "conftest.py should provide 4 CPU devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    P = jax.sharding.PartitionSpec
    params, batch = _linear_params(), _batch()
    batch = jax.tree.map(lambda a: jnp.concatenate([a, a[:2]]), batch)  # B=8.
    keys = jax.random.split(jax.random.key(9), 4)

    def per_device(params, batch, keys):
      # Replicated params: differentiating the device-mean loss yields the
      # global gradient, already reduced across devices.
      def global_loss(p):
        return jax.lax.pmean(maxup_loss(noisy_linear_loss, p, batch, keys[0], 4)[0], "data")
      return jax.value_and_grad(global_loss)(params)

    sharded = jax.jit(jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())))
    loss, grad = sharded(params, batch, keys)

    # Reference: each 2-example shard on its own, averaged.
    shard_results = [
        jax.value_and_grad(lambda p: maxup_loss(
            noisy_linear_loss, p, jax.tree.map(lambda a: a[2 * d:2 * d + 2], batch), keys[d], 4)[0])(params)
        for d in range(4)
    ]
    chex.assert_trees_all_close(loss, np.mean([r[0] for r in shard_results]), rtol=1e-5)
    chex.assert_trees_all_close(
        grad, jax.tree.map(lambda *g: sum(g) / 4, *[r[1] for r in shard_results]), rtol=1e-5, atol=1e-7)

  def test_pmap(self):
    params, batch = _linear_params(), _batch()
    batch = jax.tree.map(lambda a: jnp.concatenate([a, a[:2]]).reshape((4, 2) + a.shape[1:]), batch)
    keys = jax.random.split(jax.random.key(9), 4)

    def per_device(params, batch, key):
      loss, grad = jax.value_and_grad(lambda p: maxup_loss(noisy_linear_loss, p, batch, key, 4)[0])(params)
      return jax.lax.pmean(loss, "d"), jax.lax.pmean(grad, "d")

    loss, grad = jax.pmap(per_device, axis_name="d", in_axes=(None, 0, 0))(params, batch, keys)
    expected = np.mean([
        maxup_loss(noisy_linear_loss, params, jax.tree.map(lambda a: a[d], batch), keys[d], 4)[0]
        for d in range(4)
    ])
    chex.assert_trees_all_close(loss, jnp.full((4,), expected), rtol=1e-5)
    chex.assert_tree_all_finite(grad)


class ConvNetWithBatchNorm(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(CLASSES)(x)


class FrameworksTest(parameterized.TestCase):

  def test_linen_batchnorm_statistics_come_from_gradient_pass(self):
    model = ConvNetWithBatchNorm()
    images = jax.random.normal(jax.random.key(0), (BATCH, 8, 8, 2))
    labels = jnp.arange(BATCH) % CLASSES
    variables = model.init(jax.random.key(1), images, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def augment(keys, images):
      return images + 0.3 * jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(keys)

    def loss_fn(params, batch, keys):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, augment(keys, batch["image"]),
          train=True, mutable=["batch_stats"])
      return _xent(logits, batch["label"]), updates["batch_stats"]

    batch, key = {"image": images, "label": labels}, jax.random.key(2)
    grad_fn = jax.jit(jax.grad(
        lambda p: maxup_loss(loss_fn, p, batch, key, 4, has_aux=True), has_aux=True))
    grads, aux = grad_fn(params)
    chex.assert_tree_all_finite(grads)

    keys = jax.random.split(key, 4 * BATCH).reshape(4, BATCH)
    winners = keys[aux.selected_copy, jnp.arange(BATCH)]
    _, expected_stats = loss_fn(params, batch, winners)
    chex.assert_trees_all_close(aux.loss_aux, expected_stats, rtol=1e-6)

    # single_pass: one set of statistics per copy.
    _, aux1 = maxup_loss(loss_fn, params, batch, key, 4, has_aux=True, mode="single_pass")
    chex.assert_shape(aux1.loss_aux["BatchNorm_0"]["mean"], (4, 4))

  def test_nnx_model_through_split_and_merge(self):

    class Mlp(nnx.Module):

      def __init__(self, rngs):
        self.hidden = nnx.Linear(DIM, 8, rngs=rngs)
        self.out = nnx.Linear(8, CLASSES, rngs=rngs)

      def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))

    graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))

    def loss_fn(state, batch, keys):
      model = nnx.merge(graphdef, state)
      return _xent(model(batch["x"] + _noise(keys)), batch["y"])

    batch, key = _batch(), jax.random.key(4)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda s: maxup_loss(loss_fn, s, batch, key, 4)[0]))(state)
    chex.assert_tree_all_finite(grads)
    _, aux = maxup_loss(loss_fn, state, batch, key, 4)
    chex.assert_trees_all_close(loss, aux.copy_losses.max(0).mean(), rtol=1e-5)
    # An optimizer step on the nnx state lowers the worst-copy loss.
    new_state = jax.tree.map(lambda s, g: s - 0.1 * g, state, grads)
    assert maxup_loss(loss_fn, new_state, batch, key, 4)[0] < loss


class ErrorsTest(parameterized.TestCase):

  def _call(self, **overrides):
    kwargs = dict(loss_fn=noisy_linear_loss, params=_linear_params(), batch=_batch(),
                  key=jax.random.key(0), num_copies=2)
    kwargs.update(overrides)
    return maxup_loss(**kwargs)

  @parameterized.parameters(0, -3)
  def test_num_copies_below_one(self, num_copies):
    with pytest.raises(ValueError, match=f"num_copies must be >= 1, got {num_copies}"):
      self._call(num_copies=num_copies)

  @parameterized.parameters(2.0, True, "4", np.float32(3))
  def test_num_copies_not_int(self, num_copies):
    with pytest.raises(TypeError, match="num_copies must be a Python int"):
      self._call(num_copies=num_copies)

  def test_traced_num_copies(self):
    with pytest.raises(TypeError, match="num_copies must be a Python int"):
      jax.jit(lambda m: self._call(num_copies=m))(3)

  def test_unknown_mode(self):
    with pytest.raises(ValueError, match="mode must be one of"):
      self._call(mode="max")

  def test_key_array_instead_of_single_key(self):
    with pytest.raises(ValueError, match=r"single PRNG key of shape \(\)"):
      self._call(key=jax.random.split(jax.random.key(0), BATCH))

  def test_raw_key_of_wrong_shape(self):
    with pytest.raises(ValueError, match="single PRNG key"):
      self._call(key=jax.random.split(jax.random.PRNGKey(0), BATCH))

  def test_not_a_key(self):
    with pytest.raises(ValueError, match="single PRNG key"):
      self._call(key=jnp.zeros((2,), jnp.float32))

  def test_loss_reduced_over_batch(self):
    with pytest.raises(ValueError, match=r"shape \(6,\), got shape \(\)"):
      self._call(loss_fn=lambda p, b, k: noisy_linear_loss(p, b, k).mean())

  def test_loss_of_wrong_shape_under_jit(self):
    with pytest.raises(ValueError, match=r"got shape \(6, 3\)"):
      jax.jit(lambda p: self._call(
          params=p, loss_fn=lambda p, b, k: b["x"][:, :3] @ p["w"][:3]))(_linear_params())

  def test_aux_without_has_aux(self):
    with pytest.raises(TypeError, match="has_aux=True"):
      self._call(loss_fn=lambda p, b, k: (noisy_linear_loss(p, b, k), 0.0))

  def test_has_aux_without_aux(self):
    with pytest.raises(TypeError, match=r"\(per_example_losses, aux\)"):
      self._call(has_aux=True)

  def test_integer_losses(self):
    with pytest.raises(TypeError, match="floating-point"):
      self._call(loss_fn=lambda p, b, k: b["y"])

  def test_ragged_batch(self):
    with pytest.raises(ValueError, match="leading batch dimension"):
      self._call(batch={"x": jnp.zeros((6, DIM)), "y": jnp.zeros((5,), jnp.int32)})

  def test_empty_batch(self):
    with pytest.raises(ValueError, match="at least one array"):
      self._call(batch={})


class SelectionLossTest(parameterized.TestCase):

  def test_selection_loss_ranks_and_gradient_pass_differentiates(self):
    params, batch, key = _linear_params(), _batch(), jax.random.key(3)

    def reversed_ranking(params, batch, keys):
      return -noisy_linear_loss(params, batch, keys)

    loss, aux = maxup_loss(noisy_linear_loss, params, batch, key, 4,
                           selection_loss_fn=reversed_ranking)
    # The selection picked each example's *best* copy under loss_fn...
    _, plain_aux = maxup_loss(noisy_linear_loss, params, batch, key, 4)
    np.testing.assert_array_equal(aux.selected_copy, jnp.argmin(plain_aux.copy_losses, axis=0))
    chex.assert_trees_all_close(aux.copy_losses, -plain_aux.copy_losses)
    # ...and the returned loss is loss_fn on those copies.
    chex.assert_trees_all_close(loss, plain_aux.copy_losses.min(0).mean(), rtol=1e-6)

  def test_bfloat16_selection_agrees_with_float32_on_clear_winners(self):
    params, batch, key = _linear_params(), _batch(), jax.random.key(8)

    def bf16_loss(params, batch, keys):
      params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
      x = (batch["x"] + _noise(keys)).astype(jnp.bfloat16)
      return _xent((x @ params["w"] + params["b"]).astype(jnp.float32), batch["y"])

    loss, aux = maxup_loss(noisy_linear_loss, params, batch, key, 4, selection_loss_fn=bf16_loss)
    _, f32 = maxup_loss(noisy_linear_loss, params, batch, key, 4)
    chex.assert_trees_all_close(aux.copy_losses, f32.copy_losses, rtol=3e-2, atol=3e-2)
    assert jnp.mean(aux.selected_copy == f32.selected_copy) >= 5 / 6

  def test_selection_loss_needs_two_pass(self):
    with pytest.raises(ValueError, match="only used by mode='two_pass'"):
      maxup_loss(noisy_linear_loss, _linear_params(), _batch(), jax.random.key(0), 2,
                 mode="single_pass", selection_loss_fn=noisy_linear_loss)


class CopiesPerPassTest(parameterized.TestCase):

  # One pass per copy, uneven passes (5 = 2 + 2 + 1), and more per pass than copies.
  @parameterized.product(
      shape=((5, 1, False), (5, 2, True), (2, 10, True)), mode=("two_pass", "single_pass"))
  def test_every_copies_per_pass_gives_the_one_vmapped_pass(self, shape, mode):
    num_copies, copies_per_pass, jit = shape
    params, batch, key = _linear_params(), _batch(), jax.random.key(5)

    def run(per_pass):
      fn = lambda p: maxup_loss(noisy_linear_loss, p, batch, key, num_copies, mode=mode,
                                copies_per_pass=per_pass)
      grad_fn = jax.value_and_grad(fn, has_aux=True)
      return (jax.jit(grad_fn) if jit else grad_fn)(params)

    (loss, aux), grad = run(copies_per_pass)
    (ref_loss, ref_aux), ref_grad = run(num_copies)
    chex.assert_shape(aux.copy_losses, (num_copies, BATCH))
    chex.assert_trees_all_close(aux.copy_losses, ref_aux.copy_losses, rtol=1e-6)
    np.testing.assert_array_equal(aux.selected_copy, ref_aux.selected_copy)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6)
    # Single-pass sums the copies' gradients in another order in a loop.
    chex.assert_trees_all_close(grad, ref_grad, rtol=1e-6, atol=1e-7)

  @parameterized.parameters(0, -1, 1.5, True, None)
  def test_bad_copies_per_pass(self, copies_per_pass):
    with pytest.raises(ValueError, match="copies_per_pass must be a Python int >= 1"):
      maxup_loss(noisy_linear_loss, _linear_params(), _batch(), jax.random.key(0), 2,
                 copies_per_pass=copies_per_pass)
