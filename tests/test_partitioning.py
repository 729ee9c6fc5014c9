"""MaxUp splits over devices: per-device work of the compiled step on 4 devices vs 1.

XLA's cost analysis of a compiled program is deterministic, so these tests
read FLOPs and temporary memory per device instead of timing anything. A
step whose copies are partitioned over a batch sharded 4 ways does a quarter
of the one-device work on each device; the bound is 1.05 x that. XLA counts
a loop body once (`maxup_loss` evaluates copies in a `lax.map`), so 1 and 4
devices are compared on the same program.
"""

import contextlib
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs import cifar10_resnet20, ptb_small_lstm
from maxup_jax import augment, losses, maxup_loss, smoothing
from trainer import core, image, image_data, language

NUM_DEVICES = 4
SLACK = 1.05


def mesh_of(num_devices, explicit=False):
  axis_type = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh((num_devices,), ("data",), axis_types=(axis_type,),
                       devices=jax.devices()[:num_devices])


def compile_on(fn, args, shardings, explicit=False):
  """`jit(fn)` compiled for args placed as `shardings`."""
  args = jax.device_put(args, shardings)
  mesh = jax.tree.leaves(shardings)[0].mesh
  with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
    return jax.jit(fn).lower(*args).compile()


def cost(compiled):
  """(flops, temporary bytes) per device of a compiled program."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["flops"], compiled.memory_analysis().temp_size_in_bytes


def batch_shardings(args, mesh, batch_positions):
  """Args at `batch_positions` sharded on their first axis over `mesh`, the rest replicated."""
  return tuple(
      jax.tree.map(lambda _: NamedSharding(mesh, P("data") if i in batch_positions else P()), arg)
      for i, arg in enumerate(args))


def per_device_programs(fn, args, batch_positions, explicit=False):
  """`fn` compiled on 1 and on 4 devices, batch args sharded on their first axis."""
  meshes = [mesh_of(num_devices, explicit) for num_devices in (1, NUM_DEVICES)]
  return [compile_on(fn, args, batch_shardings(args, mesh, batch_positions), explicit)
          for mesh in meshes]


def assert_split(programs, extra_temp_bytes=0):
  (flops_1, temp_1), (flops_4, temp_4) = map(cost, programs)
  assert flops_4 <= SLACK * flops_1 / NUM_DEVICES, (
      f"per-device FLOPs {flops_4:.4g} on {NUM_DEVICES} devices vs {flops_1:.4g} on one: "
      f"{flops_4 / (flops_1 / NUM_DEVICES):.2f} x the ideal")
  assert temp_4 <= SLACK * temp_1 / NUM_DEVICES + extra_temp_bytes, (
      f"per-device temporaries {temp_4} B on {NUM_DEVICES} devices vs {temp_1} B on one")


# ---------------------------------------------------------------------------
# The library.


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.mean((1, 2)))


BATCH = 64
NET = ConvNet()
AUGMENTATIONS = {
    "gaussian": augment.gaussian_noise(0.1),
    "cutout": augment.cutout(4),
    "crop_flip": augment.random_crop_flip(2),
    "cutmix": augment.cutmix(1.0, 10),
    "mixup": augment.mixup(0.4, 10),
}


def conv_inputs():
  images = jax.random.uniform(jax.random.key(1), (BATCH, 16, 16, 3))
  batch = {"x": images, "y": jnp.arange(BATCH) % 10}
  params = NET.init(jax.random.key(0), images[:1])
  return params, batch


def maxup_grad(augmentation, num_copies=4, **kwargs):
  def loss_fn(params, batch, keys):
    images, labels = augmentation(keys, batch["x"], batch["y"])
    return losses.softmax_cross_entropy(NET.apply(params, images), labels)

  def step(params, batch, key):
    objective = lambda p: maxup_loss(loss_fn, p, batch, key, num_copies, **kwargs)[0]
    return jax.value_and_grad(objective)(params)

  return step


def bf16_selection_loss(augmentation):
  def loss_fn(params, batch, keys):
    images, labels = augmentation(keys, batch["x"], batch["y"])
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    logits = NET.apply(params, images.astype(jnp.bfloat16)).astype(jnp.float32)
    return losses.softmax_cross_entropy(logits, labels)
  return loss_fn


MIXING = ("cutmix", "mixup")


# Every augmentation two-pass; single-pass with a per-example augmentation
# (automatic sharding) and a mixing one (explicit); under explicit sharding,
# those that had to be told their output sharding (padding; CutMix for the
# partner gathers and Beta draws it shares with mixup) and Gaussian noise.
SPLIT_CASES = (
    [(name, "two_pass", False) for name in sorted(AUGMENTATIONS)]
    + [("gaussian", "single_pass", False)]
    + [(name, "two_pass", True) for name in ("crop_flip", "cutmix", "gaussian")]
    + [("cutmix", "single_pass", True)])


@pytest.mark.parametrize("name,mode,explicit", SPLIT_CASES)
def test_maxup_loss_splits_every_augmentation(name, mode, explicit):
  params, batch = conv_inputs()
  step = maxup_grad(AUGMENTATIONS[name], mode=mode)
  programs = per_device_programs(step, (params, batch, jax.random.key(2)), {1}, explicit)
  # A mixing augmentation reads partners from the whole batch: every device
  # holds the gathered input images once.
  assert_split(programs, batch["x"].nbytes if name in MIXING else 0)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_bfloat16_selection_splits(explicit):
  params, batch = conv_inputs()
  augmentation = AUGMENTATIONS["cutout"]
  step = maxup_grad(augmentation, selection_loss_fn=bf16_selection_loss(augmentation))
  assert_split(per_device_programs(step, (params, batch, jax.random.key(2)), {1}, explicit))


def test_standard_augmentation_splits():
  params, batch = conv_inputs()
  step = maxup_grad(AUGMENTATIONS["crop_flip"], num_copies=1)
  assert_split(per_device_programs(step, (params, batch, jax.random.key(2)), {1}))


def test_copies_per_pass_above_one_is_not_split_and_says_so_under_explicit_sharding():
  """k copies vmapped together merge into the batch axis ahead of the examples."""
  params, batch = conv_inputs()
  step = maxup_grad(AUGMENTATIONS["gaussian"], copies_per_pass=2)
  (flops_1, _), (flops_4, _) = map(
      cost, per_device_programs(step, (params, batch, jax.random.key(2)), {1}))
  assert flops_4 > 1.5 * flops_1 / NUM_DEVICES
  with pytest.raises(ValueError, match="copies_per_pass=2 vmaps copies together"):
    per_device_programs(step, (params, batch, jax.random.key(2)), {1}, explicit=True)


@pytest.mark.parametrize("name,mode", [("cutmix", "two_pass"), ("crop_flip", "single_pass")])
def test_explicit_sharding_gives_the_one_device_values(name, mode):
  params, batch = conv_inputs()
  step = jax.jit(maxup_grad(AUGMENTATIONS[name], mode=mode))
  key = jax.random.key(3)
  reference = step(params, batch, key)
  mesh = mesh_of(NUM_DEVICES, explicit=True)
  with jax.set_mesh(mesh):
    sharded_batch = jax.device_put(batch, P("data"))
    loss, grad = step(jax.device_put(params, P()), sharded_batch, key)
  chex.assert_trees_all_close((loss, grad), reference, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_splits_along_the_streams():
  """A time-major `[T, B, D]` output layer, streams sharded: each device its own rows."""
  steps, streams, features, vocab = 12, 32, 16, 300
  inputs = jax.random.normal(jax.random.key(0), (steps, streams, features))
  labels = jax.random.randint(jax.random.key(1), (steps, streams), 0, vocab)
  weight = jax.random.normal(jax.random.key(2), (vocab, features))
  bias = jnp.zeros((vocab,))

  def loss(inputs, labels, weight, bias):
    return jax.value_and_grad(lambda x, w, b: losses.linear_softmax_cross_entropy(
        x, w, b, labels, num_valid_rows=10 * streams, chunk_size=64).sum(),
        argnums=(0, 1, 2))(inputs, weight, bias)

  programs = []
  for num_devices in (1, NUM_DEVICES):
    mesh = mesh_of(num_devices)
    streams_sharded = NamedSharding(mesh, P(None, "data"))
    replicated = NamedSharding(mesh, P())
    programs.append(compile_on(loss, (inputs, labels, weight, bias),
                               (streams_sharded, streams_sharded, replicated, replicated)))
  assert_split(programs)


def test_certification_noise_batch_splits():
  """Randomized smoothing's Monte Carlo step: each device draws and classifies its own noise."""
  params, _ = conv_inputs()
  image = jnp.zeros((16, 16, 3))
  programs = []
  for num_devices in (1, NUM_DEVICES):
    counter = smoothing.make_counter(lambda x: NET.apply(params, x), 10, batch_size=256,
                                     sharding=mesh_of(num_devices))
    programs.append(counter.step.lower(jnp.zeros((10,), jnp.int32), image, jax.random.key(0),
                                       jnp.int32(0), jnp.int32(1000),
                                       jnp.float32(0.25)).compile())
  assert_split(programs)


# ---------------------------------------------------------------------------
# The trainers' steps.


def image_step(num_copies, mode, **augment):
  """The image task's train step (`image.build_steps`) on ResNet-8, with a batch to run it on."""
  config = cifar10_resnet20.get_config()
  config.model, config.batch_size = "resnet8", BATCH
  config.maxup.num_copies, config.maxup.mode = num_copies, mode
  config.augment.update(augment)
  steps = image.build_steps(config, core.create_mesh(1),
                            image_data.published_dataset_facts("cifar10"))
  state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), steps.abstract_state)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, (BATCH,), dtype=np.int32)}
  return steps.train_steps[num_copies], (state, batch, jax.random.key(4))


# The trainers' steps on the meshes the trainers build (automatic sharding).
# Single-pass selection and explicit sharding split in the library tests
# above; here the trainer's own parts (BatchNorm statistics, the optimizer,
# uint8 decoding) around them.
def test_image_train_step_splits():
  step, args = image_step(4, "two_pass")
  assert_split(per_device_programs(step, args, {1}))


def test_image_train_step_with_cutmix_splits_and_gathers_uint8_partners():
  """CutMix's partners cross devices, but as the uint8 pixels: 1 byte each."""
  step, args = image_step(2, "two_pass", cutmix_alpha=1.0, cutout_length=0)
  programs = per_device_programs(step, args, {1})
  assert_split(programs)
  hlo = programs[1].as_text()
  gathers = [line for line in hlo.splitlines() if " all-gather(" in line and "32,32,3]" in line]
  assert gathers and all("u8[" in line.split("=")[1].split(" all-gather")[0] for line in gathers), (
      gathers)


# Enough streams that the work per stream, which splits, outweighs the
# per-parameter work every device repeats with replicated weights.
LM_STREAMS = 64
LM_SEQ_LEN = 16
LM_DIM = 32


def language_step(num_copies, mode):
  """The language task's train step (`language.build_steps`), with a segment to run it on."""
  config = ptb_small_lstm.get_config()
  config.model.embed_dim = config.model.hidden_dim = LM_DIM
  config.maxup.num_copies, config.maxup.mode = num_copies, mode
  config.batch_size = LM_STREAMS
  vocab_size, seq_len = 100, LM_SEQ_LEN
  steps = language.build_steps(config, core.create_mesh(1), vocab_size)
  step_fn = steps.train_steps[num_copies]
  tokens = np.random.default_rng(0).integers(0, vocab_size, (LM_STREAMS, seq_len + 1))
  batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
  return lambda state, batch, key: step_fn(state, batch, jnp.int32(seq_len), key), (
      steps.init_fn(), batch, jax.random.key(5))


@functools.cache
def language_costs(num_copies, mode):
  """(flops, temporary bytes) per device of the language step on 1 and on 4 devices."""
  step, (state, batch, key) = language_step(num_copies, mode)
  costs = []
  for num_devices in (1, NUM_DEVICES):
    mesh = mesh_of(num_devices)
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    costs.append(cost(compile_on(step, (state, batch, key), (
        language.train_state_shardings(state, mesh), jax.tree.map(lambda _: data, batch),
        replicated))))
  return costs


def ideal_ratio(costs):
  (flops_1, _), (flops_4, _) = costs
  return flops_4 / (flops_1 / NUM_DEVICES)


@pytest.mark.parametrize("mode", ["two_pass", "single_pass"])
def test_language_train_step_splits(mode):
  """Each device does a quarter of the work, and MaxUp adds none that devices repeat.

  Only the per-parameter work (weight dropout of the recurrent matrices, the
  update, the average) is repeated by every device, the weights being
  replicated: a few percent here.
  """
  standard = ideal_ratio(language_costs(1, "two_pass"))
  maxup = ideal_ratio(language_costs(2, mode))
  assert maxup <= SLACK, (maxup, standard)
  assert maxup <= SLACK * standard, (maxup, standard)
