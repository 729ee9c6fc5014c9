"""A compute-efficient CIFAR network: the architecture of airbench (Jordan, 2024).

Three convolution groups, each conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3
-> BN -> GELU, after a 2x2 stem convolution, then a global max-pool and a
bias-free linear classifier whose logits are scaled by 1/9. With widths
64/256/256 it reaches ~94% on CIFAR-10 in about 10 epochs, far fewer
operations per point of accuracy than the CIFAR ResNets, and its wide
convolutions on small feature maps run efficiently on CPUs.

The stem here is learned like every other layer (airbench fixes it to a
whitening of the training patches, which needs the data at initialisation).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxup_jax.models import initializers
from maxup_jax.models.resnet_cifar import (
    check_num_classes,
    make_batch_norm,
    make_conv,
    maybe_remat,
    torch_linear_kernel_init,
)

Array = jax.Array
Dtype = Any

# 1/9: airbench's fixed logit temperature, which lets the classifier start
# from PyTorch's default init without over-confident early logits.
LOGIT_SCALE = 1.0 / 9.0


class ConvGroup(nn.Module):
  """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU."""

  features: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """`x: [B, H, W, C]` -> `[B, H // 2, W // 2, features]`."""
    conv = make_conv(self.dtype)
    norm = make_batch_norm(self.dtype, self.bn_axis_name, train)
    x = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.gelu(norm(name="bn1")(x), approximate=False)
    x = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(x)
    return nn.gelu(norm(name="bn2")(x), approximate=False)


class AirbenchNet(nn.Module):
  """airbench's CIFAR network.

  Attributes:
    num_classes: number of output classes.
    widths: channels of the three convolution groups.
    stem_features: channels of the 2x2 stem convolution.
    dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    bn_axis_name: axis name for cross-device BatchNorm statistics.
    remat: rematerialise each group in the backward pass.
  """

  num_classes: int = 10
  widths: tuple[int, int, int] = (64, 256, 256)
  stem_features: int = 24
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  remat: bool = False

  def __post_init__(self):
    check_num_classes(self.num_classes)
    if len(self.widths) != 3 or any(not isinstance(w, int) or w < 1 for w in self.widths):
      raise ValueError(f"widths must be three positive ints, got {self.widths!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """`x: [B, H, W, C]` normalised images -> float32 logits `[B, num_classes]`."""
    x = nn.Conv(self.stem_features, (2, 2), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=initializers.lecun_normal,
                name="stem")(x.astype(self.dtype))
    x = nn.gelu(x, approximate=False)
    group = maybe_remat(ConvGroup, self.remat)
    for i, features in enumerate(self.widths):
      x = group(features, self.dtype, self.bn_axis_name, name=f"group{i + 1}")(x, train)
    x = jnp.max(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                      param_dtype=jnp.float32, kernel_init=torch_linear_kernel_init(),
                      name="classifier")(x)
    return logits.astype(jnp.float32) * LOGIT_SCALE
