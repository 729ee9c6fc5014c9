"""Tests of the models: parameter counts, shapes, dtypes, BatchNorm, remat, registry."""

import functools
import itertools
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from maxup_jax.models import initializers, resnet_cifar
from maxup_jax.models import (
    MODEL_NAMES,
    CifarResNet,
    ImageNetResNet,
    PreActResNet,
    ResNet50,
    ResNet101,
    SmallCNN,
    WideResNet,
    create_model,
)


def _shard_map(fn, **kwargs):
  # BatchNorm's synchronised statistics are replicated, but not provably so
  # to the replication checker.
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, check_vma=False, **kwargs)
  from jax.experimental.shard_map import shard_map  # JAX < 0.7.

  return shard_map(fn, check_rep=False, **kwargs)


def _count_params(model, image_shape):
  """Parameter count from abstract shapes: nothing is allocated or convolved."""
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
  )
  return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def _init(model, x):
  # The rbg PRNG compiles much faster on CPU than the default threefry.
  init = jax.jit(model.init, static_argnames="train")
  return init(jax.random.key(0, impl="rbg"), x, train=False)


def _apply(model, variables, x, train, **kwargs):
  apply = jax.jit(functools.partial(model.apply, train=train, **kwargs))
  return apply(variables, x)


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


# Exact counts with 10 (CIFAR) or 1000 (ImageNet, = torchvision) classes, and
# the published figure with half a unit of its last digit. ResNet-110 with 1x1
# projection shortcuts (the paper's reference code) has 1,730,714 parameters,
# with zero-padding shortcuts 1,727,962; both are the published "1.7M".
@pytest.mark.parametrize(
    "name, num_classes, image_shape, expected, published, rounding",
    [
        ("resnet20", 10, (32, 32, 3), 272_474, 0.27e6, 0.005e6),
        ("resnet110", 10, (32, 32, 3), 1_730_714, 1.7e6, 0.05e6),
        ("preact_resnet110", 10, (32, 32, 3), 1_730_522, 1.7e6, 0.05e6),
        ("wrn28_10", 10, (32, 32, 3), 36_479_194, 36.5e6, 0.05e6),
        ("resnet50", 1000, (224, 224, 3), 25_557_032, 25.6e6, 0.05e6),
        ("resnet101", 1000, (224, 224, 3), 44_549_160, 44.55e6, 0.005e6),
    ],
)
def test_parameter_counts(name, num_classes, image_shape, expected, published, rounding):
  count = _count_params(create_model(name, num_classes), image_shape)
  assert count == expected
  assert abs(count - published) <= rounding


def test_zero_pad_shortcut_counts():
  # "Option A" of He et al. (2016): no parameters in the shortcuts.
  assert _count_params(CifarResNet(20, shortcut="zero_pad"), (32, 32, 3)) == 269_722
  assert _count_params(CifarResNet(110, shortcut="zero_pad"), (32, 32, 3)) == 1_727_962


def test_imagenet_resnet_shapes():
  model = ResNet50(num_classes=10)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert (logits.shape, logits.dtype) == ((2, 10), jnp.float32)
  # 990 fewer classifier rows of 2048 weights and a bias each than ImageNet's.
  assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == (
      25_557_032 - 990 * 2049
  )


@pytest.fixture(scope="module")
def resnet20_run():
  """ResNet-20 (7 classes) variables and outputs on one batch, in both modes."""
  model = create_model("resnet20", num_classes=7)
  x = 3.0 + _images((3, 32, 32, 3))
  variables = _init(model, x)
  eval_logits = _apply(model, variables, x, train=False)
  train_logits, updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  return x, variables, eval_logits, train_logits, updates


def test_resnet20_forward_shapes(resnet20_run):
  _, _, eval_logits, train_logits, _ = resnet20_run
  for logits in (eval_logits, train_logits):
    assert logits.shape == (3, 7)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("image_shape", [(28, 28, 1), (32, 32, 3)])
def test_small_cnn_forward_shapes(image_shape):
  model = create_model("small_cnn", num_classes=10)
  x = _images((3, *image_shape))
  variables = _init(model, x)
  assert set(variables) == {"params"}
  for train in (False, True):
    logits = _apply(model, variables, x, train=train)
    assert logits.shape == (3, 10)
    assert logits.dtype == jnp.float32


def test_train_mode_updates_batch_stats(resnet20_run):
  x, variables, _, _, updates = resnet20_run
  old_stats, new_stats = variables["batch_stats"], updates["batch_stats"]
  assert jax.tree.structure(new_stats) == jax.tree.structure(old_stats)
  # Every BatchNorm layer's running mean and variance moved.
  changed = jax.tree.map(lambda old, new: not np.allclose(old, new), old_stats, new_stats)
  assert all(jax.tree.leaves(changed))

  # Flax momentum 0.9 == PyTorch momentum 0.1: new = 0.9 old + 0.1 batch.
  stem_out = jax.lax.conv_general_dilated(
      x,
      variables["params"]["stem_conv"]["kernel"],
      (1, 1),
      ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  np.testing.assert_allclose(
      new_stats["stem_bn"]["mean"],
      0.9 * old_stats["stem_bn"]["mean"] + 0.1 * stem_out.mean(axis=(0, 1, 2)),
      rtol=1e-4,
      atol=1e-5,
  )


@pytest.mark.parametrize("name", ["resnet8", "small_cnn"])
def test_bfloat16_compute_keeps_float32_params_stats_and_logits(name):
  model = create_model(name, num_classes=10, dtype=jnp.bfloat16)
  x = _images((2, 32, 32, 3))
  variables = _init(model, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))

  logits, updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))

  # The convolutions really run in bfloat16.
  jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, x
  )
  conv_dtypes = {
      eqn.outvars[0].aval.dtype
      for eqn in jaxpr.jaxpr.eqns
      if eqn.primitive.name == "conv_general_dilated"
  }
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}

  float32_logits, _ = _apply(
      model.clone(dtype=jnp.float32), variables, x, train=True, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(logits, float32_logits, rtol=0.1, atol=0.1)


def _random_variables(model, x, seed=0):
  """Variables with random weights and non-trivial BatchNorm running statistics.

  Built from numpy values on the abstract shapes, so no initialiser is
  compiled; random running means and variances, unlike the initial zeros and
  ones, make eval-mode BatchNorm do real work.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      # He scaling keeps the trunk's activations O(1); the classifier gets
      # unit gain so the logits stay a few units.
      gain = 1.0 if "classifier" in jax.tree_util.keystr(path) else 2.0
      value = rng.standard_normal(leaf.shape) * np.sqrt(gain / np.prod(leaf.shape[:-1]))
    elif "scale" in name or "var" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # biases and running means
      value = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# XLA:CPU in jaxlib 0.12 turned the jitted eval-mode bfloat16 forward of every
# BatchNorm model into all-NaN logits, while the eager and train-mode forwards
# stayed finite (see `classifier_head`).
@pytest.mark.parametrize("name", ["resnet8", "preact_resnet8", "wrn10_2"])
def test_jitted_bfloat16_eval_forward_is_finite_and_matches(name):
  model = create_model(name, num_classes=10, dtype=jnp.bfloat16)
  x = _images((2, 32, 32, 3))
  variables = _random_variables(model, x)

  logits = _apply(model, variables, x, train=False)
  assert logits.dtype == jnp.float32
  assert np.isfinite(logits).all()

  float32_logits = _apply(model.clone(dtype=jnp.float32), variables, x, train=False)
  scale = float(np.abs(float32_logits).max())
  np.testing.assert_allclose(logits, float32_logits, rtol=0, atol=5e-2 * scale)

  # Op-by-op execution and the fused program round to bfloat16 at different
  # points, so they agree to a few bfloat16 ulps of the logits, not exactly.
  eager_logits = model.apply(variables, x, train=False)
  np.testing.assert_allclose(logits, eager_logits, rtol=0, atol=2e-2 * scale)


def test_remat_matches_plain_outputs_and_gradients():
  # Pre-activation blocks with dropout: the rematerialised forward pass must
  # also redraw the same dropout masks.
  model = WideResNet(depth=10, widen_factor=2, dropout_rate=0.3, num_classes=5)
  x = _images((2, 8, 8, 3))
  variables = _init(model, x)
  remat_model = model.clone(remat=True)

  def loss(module, params):
    logits, updates = module.apply(
        {**variables, "params": params},
        x,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(2, impl="rbg")},
    )
    return jnp.sum(logits**2), (logits, updates)

  def grad(module):
    return jax.jit(jax.grad(functools.partial(loss, module), has_aux=True))(variables["params"])

  grads, (logits, updates) = grad(model)
  remat_grads, (remat_logits, remat_updates) = grad(remat_model)

  # Same variable tree, so checkpoints move between the two settings.
  remat_variables = jax.eval_shape(
      lambda: remat_model.init(jax.random.key(0), x, train=False)
  )
  assert jax.tree.structure(remat_variables) == jax.tree.structure(variables)
  np.testing.assert_allclose(remat_logits, logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), remat_grads, grads
  )
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
      remat_updates,
      updates,
  )


class _TwoStageBottleneckNet(ImageNetResNet):
  """The ImageNet ResNet code path at a size that initialises in a moment."""

  stage_sizes: ClassVar[tuple[int, ...]] = (1, 1)


def test_zero_init_residual_zeroes_last_bn_scale():
  x = jnp.zeros((1, 32, 32, 3))
  params = _init(_TwoStageBottleneckNet(num_classes=10, zero_init_residual=True), x)["params"]
  for name in ("stage1_block1", "stage2_block1"):
    assert np.all(params[name]["bn3"]["scale"] == 0)
    assert np.all(params[name]["bn2"]["scale"] == 1)
    # The shortcut BN keeps scale 1, so each block starts as its shortcut.
    assert np.all(params[name]["shortcut_bn"]["scale"] == 1)


def test_synchronised_batch_norm_matches_full_batch():
  devices = jax.devices()[:4]
  if len(devices) < 2:
    pytest.skip("needs several (simulated) devices")
  mesh = Mesh(np.array(devices), ("batch",))
  x = _images((2 * len(devices), 16, 16, 3))
  model = CifarResNet(8, num_classes=3)
  synced = model.clone(bn_axis_name="batch")
  variables = _init(model, x)

  logits, updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])

  def sharded_step(variables, x):
    return synced.apply(variables, x, train=True, mutable=["batch_stats"])

  sharded = _shard_map(
      sharded_step,
      mesh=mesh,
      in_specs=(PartitionSpec(), PartitionSpec("batch")),
      out_specs=(PartitionSpec("batch"), PartitionSpec()),
  )
  sharded_logits, sharded_updates = jax.jit(sharded)(variables, x)
  np.testing.assert_allclose(sharded_logits, logits, rtol=1e-4, atol=1e-4)
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
      sharded_updates,
      updates,
  )


def test_registry_names_build_the_right_models():
  assert isinstance(create_model("resnet110", 10), CifarResNet)
  assert create_model("resnet110", 10).depth == 110
  assert create_model("resnet56", 100).num_classes == 100
  assert isinstance(create_model("resnet50", 1000), ResNet50)
  assert isinstance(create_model("resnet101", 1000), ResNet101)
  cifar50 = create_model("cifar_resnet50", 10)
  assert isinstance(cifar50, CifarResNet) and cifar50.depth == 50
  assert create_model("preact_resnet164", 10).depth == 164
  wrn = create_model("wrn16_4", 10, dropout_rate=0.3)
  assert (wrn.depth, wrn.widen_factor, wrn.dropout_rate) == (16, 4, 0.3)
  assert isinstance(create_model("small_cnn", 10), SmallCNN)
  assert create_model("resnet20", 10, remat=True, bn_axis_name="b").remat
  for name in MODEL_NAMES:
    create_model(name, 10)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("resnet", {}, "Unknown model name 'resnet'.*resnet110.*wrn28_10"),
        ("vgg16", {}, "Unknown model name 'vgg16'.*small_cnn"),
        ("resnet18", {}, "Unknown model name 'resnet18'.*6n\\+2.*50, 101, 152"),
        ("preact_resnet100", {}, "depth must be 6n\\+2.*got 100"),
        ("wrn27_10", {}, "depth must be 6n\\+4.*got 27"),
        ("wrn28_0", {}, "widen_factor must be a positive int, got 0"),
        ("resnet20", {"depth": 32}, "depth=32 conflicts with model name 'resnet20'"),
        ("resnet20", {"dropout_rate": 0.1}, "no attribute 'dropout_rate'.*remat"),
        ("resnet20", {"shortcut": "conv"}, "shortcut must be one of.*projection.*got 'conv'"),
        ("wrn28_10", {"dropout_rate": 1.0}, "dropout_rate must be in \\[0, 1\\)"),
    ],
)
def test_bad_names_and_arguments_raise(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    create_model(name, 10, **kwargs)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes_raise(num_classes):
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    create_model("resnet20", num_classes)


@pytest.mark.parametrize("depth", [21, 0, 2, "20", 20.0])
def test_bad_depth_raises_in_constructor(depth):
  with pytest.raises(ValueError, match="CifarResNet depth must be 6n\\+2"):
    CifarResNet(depth)
  with pytest.raises(ValueError, match="PreActResNet depth must be 6n\\+2"):
    PreActResNet(depth)


# stem 2*2*3*24 + 24; group(c_in -> w): 9*c_in*w + 9*w*w + 4*w (two BN scale+bias);
# classifier 256*10, no bias.
_AIRBENCH_PARAMS = (2 * 2 * 3 * 24 + 24
                    + 9 * 24 * 64 + 9 * 64 * 64 + 4 * 64
                    + 9 * 64 * 256 + 9 * 256 * 256 + 4 * 256
                    + 9 * 256 * 256 + 9 * 256 * 256 + 4 * 256
                    + 256 * 10)


def test_airbench_parameter_count_and_shapes():
  model = create_model("airbench", 10)
  assert _count_params(model, (32, 32, 3)) == _AIRBENCH_PARAMS == 1_972_792
  small = create_model("airbench_32_64_128", 10)
  assert small.widths == (32, 64, 128)
  x = _images((3, 32, 32, 3))
  variables = _init(small, x)
  logits, updates = _apply(small, variables, x, train=True, mutable=["batch_stats"])
  chex.assert_shape(logits, (3, 10))
  chex.assert_type(logits, jnp.float32)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)),
                         updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Eval mode is a pure function of the variables: jitted equals eager.
  eager = small.apply(variables, x, train=False)
  np.testing.assert_allclose(_apply(small, variables, x, train=False), eager,
                             rtol=1e-5, atol=1e-6)


def test_airbench_remat_matches_plain_gradients():
  model = create_model("airbench_8_8_16", 4)
  x = _images((2, 32, 32, 3))
  variables = _init(model, x)

  def grad(module):
    def loss(params):
      logits, _ = module.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
      return jnp.sum(logits**2)
    return jax.jit(jax.grad(loss))(variables["params"])

  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               grad(model.clone(remat=True)), grad(model))


@pytest.mark.parametrize("name", ["airbench_0_64_128", "airbench_32_64"])
def test_airbench_bad_widths_raise(name):
  with pytest.raises(ValueError, match="airbench|widths must be three positive ints"):
    create_model(name, 10)


# ---------------------------------------------------------------------------
# Initialisers drawn as one vector (maxup_jax/models/initializers.py).


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_flat_variance_scaling_is_jax_variance_scaling_bit_for_bit(jit):
  settings = [(2.0, "fan_out", "normal"), (1.0, "fan_in", "truncated_normal"),
              (1.0 / 3.0, "fan_in", "uniform"), (1.0, "fan_avg", "normal")]
  for setting, shape in itertools.product(settings, [(2, 3, 5, 4), (40, 10)]):
    ours = initializers.variance_scaling(*setting)
    theirs = jax.nn.initializers.variance_scaling(*setting)
    draw = lambda init, shape=shape: init(jax.random.key(7), shape, jnp.float32)
    if jit:
      draw = jax.jit(draw, static_argnums=0)
    got, want = draw(ours), draw(theirs)
    chex.assert_shape(got, shape)
    np.testing.assert_array_equal(got, want, err_msg=f"{setting} {shape}")


def test_models_initialise_as_with_flax_initialisers(monkeypatch):
  # The flat draws are the models' defaults; swapping JAX's own initialisers
  # back in gives the same parameters.
  x = _images((1, 32, 32, 3))

  model = create_model("airbench_8_8_16", 10)  # Convolutions of both kinds.
  # With the default threefry keys, which the equality is about.
  init = lambda: jax.jit(model.init, static_argnames="train")(jax.random.key(3), x, train=False)
  flat = init()
  monkeypatch.setattr(resnet_cifar, "conv_kernel_init",
                      jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
  monkeypatch.setattr(initializers, "lecun_normal", jax.nn.initializers.lecun_normal())
  chex.assert_trees_all_equal(flat, init())


@pytest.mark.parametrize("args,match", [
    ((0.0, "fan_in", "normal"), "scale must be positive"),
    ((1.0, "fan_geo", "normal"), "mode must be one of"),
    ((1.0, "fan_in", "cauchy"), "distribution must be one of")])
def test_flat_variance_scaling_rejects_bad_settings(args, match):
  with pytest.raises(ValueError, match=match):
    initializers.variance_scaling(*args)
  with pytest.raises(ValueError, match="rank >= 2"):
    initializers.variance_scaling(1.0, "fan_in", "normal")(jax.random.key(0), (8,))
