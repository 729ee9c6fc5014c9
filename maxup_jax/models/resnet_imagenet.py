"""Bottleneck ResNets for ImageNet (224x224), laid out as torchvision's.

ResNet v1.5 (He et al., 2016a, with the stride of each downsampling
bottleneck on its 3x3 convolution, as in torchvision): stem 7x7/2 conv -> BN
-> ReLU -> 3x3/2 max pool, four stages of bottleneck blocks with 64, 128,
256, 512 bottleneck channels (x4 output channels), global average pool,
linear classifier. Padding, initialisation and BatchNorm constants follow
torchvision, so with 1000 classes the parameter counts equal torchvision's:
ResNet-50 25,557,032, ResNet-101 44,549,160, ResNet-152 60,192,808.

Input: already-normalised NHWC float images `[B, H, W, 3]`; output: float32
logits `[B, num_classes]`. BatchNorm statistics live in the 'batch_stats'
collection.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxup_jax.models.resnet_cifar import (
    check_num_classes,
    classifier_head,
    make_batch_norm,
    make_conv,
    maybe_remat,
)

Array = jax.Array
Dtype = Any


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a projection shortcut.

  Attributes:
    features: bottleneck channels; the block outputs `4 * features`.
    strides: stride of the 3x3 convolution and of the projection shortcut.
    zero_init_residual: initialise the last BN scale to zero so the block
      starts as the identity (Goyal et al., 2017).
    dtype: computation dtype.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
  """

  features: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, C_in]` -> `[B, H / strides, W / strides, 4 * features]`."""
    conv = make_conv(self.dtype)
    norm = make_batch_norm(self.dtype, self.bn_axis_name, train)
    s = self.strides
    out_features = self.features * self.expansion

    y = conv(self.features, (1, 1), padding="VALID", name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), (s, s), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(out_features, (1, 1), padding="VALID", name="conv3")(y)
    last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = norm(scale_init=last_scale_init, name="bn3")(y)

    residual = x
    if s != 1 or x.shape[-1] != out_features:
      residual = conv(out_features, (1, 1), (s, s), padding="VALID", name="shortcut_conv")(x)
      residual = norm(name="shortcut_bn")(residual)
    return nn.relu(y + residual)


class ImageNetResNet(nn.Module):
  """Bottleneck ResNet; subclasses fix `stage_sizes` (blocks per stage).

  Attributes:
    num_classes: number of classes.
    zero_init_residual: zero-initialise the last BN scale of every block.
    dtype: computation dtype; params and BatchNorm statistics stay float32.
    bn_axis_name: if set, BatchNorm averages its batch statistics over this
      mapped axis (synchronised BN under `shard_map`/`pmap`).
    remat: recompute each residual block in the backward pass instead of
      storing its activations.
  """

  num_classes: int = 1000
  zero_init_residual: bool = False
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  remat: bool = False

  stage_sizes: ClassVar[tuple[int, ...]] = ()

  def __post_init__(self):
    if not self.stage_sizes:
      raise TypeError(
          f"{type(self).__name__} has no stage_sizes; use ResNet50, ResNet101 or ResNet152."
      )
    check_num_classes(self.num_classes)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, 3]` normalised images -> `[B, num_classes]` float32 logits."""
    block_cls = maybe_remat(BottleneckBlock, self.remat)

    x = make_conv(self.dtype)(64, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
    x = make_batch_norm(self.dtype, self.bn_axis_name, train)(name="stem_bn")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        # Explicit names keep the parameter tree identical with and without
        # remat (whose wrapper class would change the automatic names).
        x = block_cls(
            features=64 * 2**stage,
            strides=strides,
            zero_init_residual=self.zero_init_residual,
            dtype=self.dtype,
            bn_axis_name=self.bn_axis_name,
            name=f"stage{stage + 1}_block{block + 1}",
        )(x, train)
    return classifier_head(x, self.num_classes, self.dtype)


class ResNet50(ImageNetResNet):
  """ResNet-50: 3, 4, 6, 3 bottlenecks; 25,557,032 parameters with 1000 classes."""

  stage_sizes: ClassVar[tuple[int, ...]] = (3, 4, 6, 3)


class ResNet101(ImageNetResNet):
  """ResNet-101: 3, 4, 23, 3 bottlenecks; 44,549,160 parameters with 1000 classes."""

  stage_sizes: ClassVar[tuple[int, ...]] = (3, 4, 23, 3)


class ResNet152(ImageNetResNet):
  """ResNet-152: 3, 8, 36, 3 bottlenecks; 60,192,808 parameters with 1000 classes."""

  stage_sizes: ClassVar[tuple[int, ...]] = (3, 8, 36, 3)
