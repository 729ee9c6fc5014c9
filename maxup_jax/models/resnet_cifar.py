"""Networks for small images (CIFAR 32x32, MNIST 28x28) used in the MaxUp paper.

* `CifarResNet`: the ResNet of He et al. (2016a, sec. 4.2) for CIFAR,
  depth 6n+2, post-activation basic blocks, stage widths 16/32/64.
* `PreActResNet`: the pre-activation ResNet of He et al. (2016b), same layout.
* `WideResNet`: WRN-d-k of Zagoruyko & Komodakis (2016), depth 6n+4.
* `SmallCNN`: a two-convolution network for tests and MNIST.

The ResNets follow the public code the paper trained with
(github.com/junyuseu/pytorch-cifar-models): stride-2 stages start with a 1x1
convolution shortcut ("option B"), the post-activation net batch-normalises
that projection and the pre-activation net does not. Convolutions are
initialised like that code (normal, std sqrt(2 / fan_out)), the classifier
like PyTorch's `nn.Linear`, and BatchNorm uses PyTorch's momentum (0.1 in
PyTorch's convention, 0.9 in flax's) and epsilon.

All modules take already-normalised NHWC float images, `x: [B, H, W, C]`, and
return float32 logits `[B, num_classes]`. BatchNorm statistics live in the
'batch_stats' collection, so train-mode calls need
`mutable=['batch_stats']`; `WideResNet` with `dropout_rate > 0` also needs a
'dropout' PRNG stream in train mode.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxup_jax.models import initializers

Array = jax.Array
Dtype = Any

# PyTorch's nn.BatchNorm2d defaults (momentum 0.1 there is the weight of the
# new batch; flax's momentum is the weight of the old running average).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Kaiming normal with fan_out, as `normal_(0, sqrt(2 / (k * k * out)))` in the
# reference code.
conv_kernel_init = initializers.variance_scaling(2.0, "fan_out", "normal")

SHORTCUTS = ("projection", "zero_pad")


def torch_linear_kernel_init() -> Callable[..., Array]:
  """PyTorch's default `nn.Linear` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default `nn.Linear` bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  The bias initialiser only sees the bias shape `[out]`, so the fan-in is
  bound here.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def classifier_head(x: Array, num_classes: int, dtype: Dtype) -> Array:
  """Global average pool and linear classifier.

  Args:
    x: `[B, H, W, C]` features.
    num_classes: number of output classes.
    dtype: computation dtype of the dense layer.

  Returns:
    `[B, num_classes]` float32 logits.
  """
  if x.dtype != jnp.float32:
    # XLA:CPU (jaxlib 0.12) fuses the pooling reduction with the convolution
    # trunk that feeds it into one YNNPACK fusion, and that fusion returns
    # NaN/inf when two convolutions in it are each followed by a bfloat16
    # max/min against the same (CSE'd) constant, as ReLUs are; eval-mode
    # BatchNorm is elementwise, so the whole trunk ends up in the fusion. The
    # barrier keeps the reduction out of it; it costs no arithmetic, and
    # float32 features, which that fusion handles correctly, skip it.
    x = jax.lax.optimization_barrier(x)
  x = jnp.mean(x, axis=(1, 2))
  x = nn.Dense(
      num_classes,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_linear_kernel_init(),
      bias_init=torch_linear_bias_init(x.shape[-1]),
      name="classifier",
  )(x)
  return x.astype(jnp.float32)


def check_num_classes(num_classes: Any) -> None:
  """Raises ValueError unless `num_classes` is a positive int."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")


_EXAMPLE_DEPTHS = {2: (20, 32, 44, 56, 110), 4: (16, 22, 28, 40)}


def _check_stage_depth(depth: Any, offset: int, model: str) -> int:
  """Returns the blocks per stage n for `depth = 6n + offset`, or raises."""
  if (
      isinstance(depth, bool)
      or not isinstance(depth, int)
      or depth < 6 + offset
      or (depth - offset) % 6
  ):
    raise ValueError(
        f"{model} depth must be 6n+{offset} with n >= 1 "
        f"(e.g. {', '.join(map(str, _EXAMPLE_DEPTHS[offset]))}), "
        f"got {depth!r}."
    )
  return (depth - offset) // 6


def make_conv(dtype: Dtype) -> Callable[..., nn.Conv]:
  """Bias-free convolution constructor: float32 params, Kaiming fan-out init.

  Callers pass explicit symmetric padding (PyTorch's `padding=k // 2`) rather
  than 'SAME', which pads stride-2 convolutions of even inputs asymmetrically.
  """
  return functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_kernel_init,
  )


def make_batch_norm(
    dtype: Dtype, axis_name: str | None, train: bool
) -> Callable[..., nn.BatchNorm]:
  """BatchNorm constructor with PyTorch's momentum and epsilon.

  Batch statistics are reduced in float32 and scale, bias and running
  averages are float32 whatever the computation dtype. Unlike PyTorch, flax
  tracks the biased batch variance; the difference is a factor
  `n / (n - 1)` with n the per-channel element count, negligible here.

  Args:
    dtype: computation (output) dtype.
    axis_name: mapped axis to average batch statistics over, or None.
    train: normalise with batch statistics and update the running averages
      (True) or normalise with the running averages (False).
  """
  return functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      dtype=dtype,
      param_dtype=jnp.float32,
      axis_name=axis_name,
  )


def maybe_remat(block_cls: type[nn.Module], remat: bool) -> type[nn.Module]:
  """`nn.remat(block_cls)` if `remat` else `block_cls`, for `block(x, train)`."""
  # `train` (argument 2 counting `self`) selects Python control flow, so it
  # must stay static under rematerialisation.
  return nn.remat(block_cls, static_argnums=(2,)) if remat else block_cls


class BasicBlock(nn.Module):
  """Post-activation residual block: conv-BN-ReLU-conv-BN, add, ReLU.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the shortcut).
    shortcut: 'projection' (1x1 conv + BN when the shape changes) or
      'zero_pad' (subsample and zero-pad the channels, "option A").
    dtype: computation dtype.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
  """

  features: int
  strides: int = 1
  shortcut: str = "projection"
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, C_in]` -> `[B, H / strides, W / strides, features]`."""
    conv = make_conv(self.dtype)
    norm = make_batch_norm(self.dtype, self.bn_axis_name, train)
    s = self.strides

    y = conv(self.features, (3, 3), (s, s), padding=((1, 1), (1, 1)), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = norm(name="bn2")(y)

    residual = x
    if s != 1 or x.shape[-1] != self.features:
      if self.shortcut == "projection":
        residual = conv(self.features, (1, 1), (s, s), padding="VALID", name="shortcut_conv")(x)
        residual = norm(name="shortcut_bn")(residual)
      else:
        residual = x[:, ::s, ::s, :]
        extra = self.features - x.shape[-1]
        residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(y + residual)


class PreActBasicBlock(nn.Module):
  """Pre-activation residual block: BN-ReLU-conv-BN-ReLU-[dropout]-conv, add.

  When the shape changes, the shortcut is a 1x1 convolution (no BN) of the
  pre-activated input, as in the reference code of both He et al. (2016b) and
  Zagoruyko & Komodakis (2016); otherwise it is the raw input.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the shortcut).
    dropout_rate: dropout between the two convolutions (wide ResNets).
    dtype: computation dtype.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
  """

  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, C_in]` -> `[B, H / strides, W / strides, features]`."""
    conv = make_conv(self.dtype)
    norm = make_batch_norm(self.dtype, self.bn_axis_name, train)
    s = self.strides

    preact = nn.relu(norm(name="bn1")(x))
    residual = x
    if s != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, (1, 1), (s, s), padding="VALID", name="shortcut_conv")(preact)

    y = conv(self.features, (3, 3), (s, s), padding=((1, 1), (1, 1)), name="conv1")(preact)
    y = nn.relu(norm(name="bn2")(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    return y + residual


class CifarResNet(nn.Module):
  """ResNet-`depth` for CIFAR (He et al., 2016a, section 4.2), depth = 6n+2.

  Stem 3x3 conv (16) -> BN -> ReLU, three stages of n basic blocks with 16,
  32, 64 channels (stride 2 at the start of stages 2 and 3), global average
  pool, linear classifier. With 10 classes ResNet-20 has 272,474 parameters
  (0.27M) and ResNet-110 1,730,714 (1.7M); with `shortcut='zero_pad'` they
  have 269,722 and 1,727,962.

  Attributes:
    depth: 20, 32, 44, 56, 110, ... (any 6n+2).
    num_classes: number of classes.
    shortcut: 'projection' (1x1 conv + BN, as the paper's reference code) or
      'zero_pad' (parameter-free "option A" of He et al.).
    dtype: computation dtype; params and BatchNorm statistics stay float32.
    bn_axis_name: if set, BatchNorm averages its batch statistics over this
      mapped axis (synchronised BN under `shard_map`/`pmap`).
    remat: recompute each residual block in the backward pass instead of
      storing its activations.
  """

  depth: int
  num_classes: int = 10
  shortcut: str = "projection"
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  remat: bool = False

  def __post_init__(self):
    _check_stage_depth(self.depth, 2, "CifarResNet")
    check_num_classes(self.num_classes)
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, C]` normalised images -> `[B, num_classes]` float32 logits."""
    blocks_per_stage = _check_stage_depth(self.depth, 2, "CifarResNet")
    block_cls = maybe_remat(BasicBlock, self.remat)

    x = make_conv(self.dtype)(16, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
    x = make_batch_norm(self.dtype, self.bn_axis_name, train)(name="stem_bn")(x)
    x = nn.relu(x)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        # Explicit names keep the parameter tree identical with and without
        # remat (whose wrapper class would change the automatic names).
        x = block_cls(
            features=features,
            strides=strides,
            shortcut=self.shortcut,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            name=f"stage{stage + 1}_block{block + 1}",
        )(x, train)
    return classifier_head(x, self.num_classes, self.dtype)


class PreActResNet(nn.Module):
  """Pre-activation ResNet-`depth` for CIFAR (He et al., 2016b), depth = 6n+2.

  Stem 3x3 conv (16), three stages of n pre-activation basic blocks with 16,
  32, 64 channels, final BN -> ReLU, global average pool, linear classifier.
  PreAct-ResNet-110 has 1,730,522 parameters with 10 classes (1.7M).

  Attributes:
    depth: 20, 32, 44, 56, 110, ... (any 6n+2).
    num_classes: number of classes.
    dtype: computation dtype; params and BatchNorm statistics stay float32.
    bn_axis_name: if set, BatchNorm averages its batch statistics over this
      mapped axis (synchronised BN under `shard_map`/`pmap`).
    remat: recompute each residual block in the backward pass instead of
      storing its activations.
  """

  depth: int
  num_classes: int = 10
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  remat: bool = False

  def __post_init__(self):
    _check_stage_depth(self.depth, 2, "PreActResNet")
    check_num_classes(self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, C]` normalised images -> `[B, num_classes]` float32 logits."""
    return _preact_network(
        x, train, blocks_per_stage=_check_stage_depth(self.depth, 2, "PreActResNet"),
        widen_factor=1, dropout_rate=0.0, num_classes=self.num_classes, dtype=self.dtype,
        bn_axis_name=self.bn_axis_name, remat=self.remat)


def _preact_network(x: Array, train: bool, *, blocks_per_stage: int, widen_factor: int,
                    dropout_rate: float, num_classes: int, dtype: Dtype,
                    bn_axis_name: str | None, remat: bool) -> Array:
  """The pre-activation CIFAR network shared by PreActResNet and WideResNet.

  Stem conv (16), three stages of `blocks_per_stage` pre-activation blocks
  with 16k, 32k, 64k channels, final BN -> ReLU, pool and classifier. Called
  inside a compact `__call__`, so its layers belong to the calling module.
  """
  block_cls = maybe_remat(PreActBasicBlock, remat)
  x = make_conv(dtype)(16, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
  for stage, features in enumerate((16, 32, 64)):
    for block in range(blocks_per_stage):
      x = block_cls(
          features=features * widen_factor,
          strides=2 if stage > 0 and block == 0 else 1,
          dropout_rate=dropout_rate,
          dtype=dtype,
          bn_axis_name=bn_axis_name,
          name=f"stage{stage + 1}_block{block + 1}",
      )(x, train)
  x = make_batch_norm(dtype, bn_axis_name, train)(name="final_bn")(x)
  x = nn.relu(x)
  return classifier_head(x, num_classes, dtype)


class WideResNet(nn.Module):
  """WRN-`depth`-`widen_factor` (Zagoruyko & Komodakis, 2016), depth = 6n+4.

  Stem 3x3 conv (16), three stages of n pre-activation wide basic blocks with
  16k, 32k, 64k channels (1x1 conv shortcut where the shape changes), final
  BN -> ReLU, global average pool, linear classifier. WRN-28-10 has
  36,479,194 parameters with 10 classes (36.5M).

  Attributes:
    depth: 16, 22, 28, 40, ... (any 6n+4).
    widen_factor: channel multiplier k.
    dropout_rate: dropout between the two convolutions of each block (the
      MaxUp paper uses 0); when > 0, train mode needs a 'dropout' PRNG stream.
    num_classes: number of classes.
    dtype: computation dtype; params and BatchNorm statistics stay float32.
    bn_axis_name: if set, BatchNorm averages its batch statistics over this
      mapped axis (synchronised BN under `shard_map`/`pmap`).
    remat: recompute each residual block in the backward pass instead of
      storing its activations.
  """

  depth: int = 28
  widen_factor: int = 10
  dropout_rate: float = 0.0
  num_classes: int = 10
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  remat: bool = False

  def __post_init__(self):
    _check_stage_depth(self.depth, 4, "WideResNet")
    check_num_classes(self.num_classes)
    k = self.widen_factor
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f"widen_factor must be a positive int, got {k!r}.")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, C]` normalised images -> `[B, num_classes]` float32 logits."""
    return _preact_network(
        x, train, blocks_per_stage=_check_stage_depth(self.depth, 4, "WideResNet"),
        widen_factor=self.widen_factor, dropout_rate=self.dropout_rate,
        num_classes=self.num_classes, dtype=self.dtype, bn_axis_name=self.bn_axis_name,
        remat=self.remat)


class SmallCNN(nn.Module):
  """Two 3x3 conv + max-pool layers, a hidden dense layer and a classifier.

  Works on any image size divisible by 4 (MNIST 28x28x1, CIFAR 32x32x3); the
  hidden layer's fan-in follows from the input size. Has no BatchNorm:
  `bn_axis_name` and `remat` are accepted so every registry model shares one
  interface, and have no effect.

  Attributes:
    num_classes: number of classes.
    hidden_features: width of the hidden dense layer.
    dtype: computation dtype; params stay float32.
    bn_axis_name: unused.
    remat: unused.
  """

  num_classes: int = 10
  hidden_features: int = 128
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  remat: bool = False

  def __post_init__(self):
    check_num_classes(self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, C]` normalised images -> `[B, num_classes]` float32 logits."""
    del train  # Same function in train and eval mode.
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    conv = functools.partial(nn.Conv, padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
                             kernel_init=initializers.lecun_normal)
    x = nn.relu(conv(32, (3, 3), name="conv1")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(conv(64, (3, 3), name="conv2")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(dense(self.hidden_features, name="hidden")(x))
    x = dense(self.num_classes, name="classifier")(x)
    return x.astype(jnp.float32)
