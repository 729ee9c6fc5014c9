"""Flax models of the MaxUp experiments and a registry that builds them by name.

Every model is a `flax.linen` module called as `model.apply(variables, x,
train=...)` on already-normalised NHWC float images `x: [B, H, W, C]`,
returning float32 logits `[B, num_classes]`. BatchNorm statistics live in the
'batch_stats' collection.

Registry names (`create_model`):

* 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', ...: CIFAR
  ResNet, any depth 6n+2 except 50 and 152, which name the ImageNet nets
  (the CIFAR ones of those depths are 'cifar_resnet50', 'cifar_resnet152').
* 'cifar_resnet<6n+2>': CIFAR ResNet of any depth.
* 'preact_resnet<6n+2>': pre-activation CIFAR ResNet, e.g. 'preact_resnet110'.
* 'wrn<6n+4>_<k>': wide ResNet, e.g. 'wrn28_10'.
* 'resnet50', 'resnet101', 'resnet152': ImageNet bottleneck ResNets.
* 'small_cnn': two-convolution network for tests and MNIST.
* 'airbench': airbench's compute-efficient CIFAR network (widths 64/256/256);
  'airbench_<w1>_<w2>_<w3>' sets the widths of its three groups.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn

from maxup_jax.models.airbench import AirbenchNet
from maxup_jax.models.resnet_cifar import CifarResNet, PreActResNet, SmallCNN, WideResNet
from maxup_jax.models.resnet_imagenet import (
    ImageNetResNet,
    ResNet50,
    ResNet101,
    ResNet152,
)

__all__ = [
    "MODEL_NAMES",
    "AirbenchNet",
    "CifarResNet",
    "ImageNetResNet",
    "PreActResNet",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "SmallCNN",
    "WideResNet",
    "create_model",
]

_IMAGENET_RESNETS: dict[int, type[ImageNetResNet]] = {
    50: ResNet50,
    101: ResNet101,
    152: ResNet152,
}

# The names used in the paper and the usual companions; the patterns in
# `_NAME_PATTERNS` accept more depths and widths.
MODEL_NAMES: tuple[str, ...] = (
    "small_cnn",
    "airbench",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "preact_resnet110",
    "wrn28_10",
    "resnet50",
    "resnet101",
    "resnet152",
)
"""The registry names of the paper's models; `create_model` also accepts the
patterns listed in the module docstring."""

_NAME_PATTERNS = (
    "resnet<6n+2> (CIFAR; except 50, 152)",
    "cifar_resnet<6n+2>",
    "preact_resnet<6n+2>",
    "wrn<6n+4>_<k>",
    "airbench_<w1>_<w2>_<w3>",
)


def _unknown_name_error(name: Any, reason: str = "") -> ValueError:
  return ValueError(
      f"Unknown model name {name!r}{reason}. Valid names: {', '.join(MODEL_NAMES)}; "
      f"or the patterns {', '.join(_NAME_PATTERNS)}."
  )


def _resolve(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
  """Maps a registry name to a module class and the attributes it fixes."""
  if name == "small_cnn":
    return SmallCNN, {}
  if name == "airbench":
    return AirbenchNet, {}
  if match := re.fullmatch(r"airbench_(\d+)_(\d+)_(\d+)", name):
    return AirbenchNet, {"widths": tuple(int(w) for w in match.groups())}
  if match := re.fullmatch(r"resnet(\d+)", name):
    depth = int(match.group(1))
    if depth in _IMAGENET_RESNETS:
      return _IMAGENET_RESNETS[depth], {}
    if depth < 8 or (depth - 2) % 6:
      raise _unknown_name_error(name, " (CIFAR ResNet depths are 6n+2; ImageNet: 50, 101, 152)")
    return CifarResNet, {"depth": depth}
  if match := re.fullmatch(r"cifar_resnet(\d+)", name):
    return CifarResNet, {"depth": int(match.group(1))}
  if match := re.fullmatch(r"preact_resnet(\d+)", name):
    return PreActResNet, {"depth": int(match.group(1))}
  if match := re.fullmatch(r"wrn(\d+)_(\d+)", name):
    return WideResNet, {"depth": int(match.group(1)), "widen_factor": int(match.group(2))}
  raise _unknown_name_error(name)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the model called `name` (see the module docstring for names).

  Args:
    name: registry name, e.g. 'resnet110', 'preact_resnet110', 'wrn28_10',
      'resnet50', 'small_cnn'.
    num_classes: number of output classes.
    **kwargs: further module attributes, e.g. `dtype=jnp.bfloat16`,
      `bn_axis_name='batch'`, `remat=True`, `dropout_rate` (wide ResNets),
      `shortcut` (CIFAR ResNets), `zero_init_residual` (ImageNet ResNets).

  Returns:
    An unbound flax module, called as `model.apply(variables, x, train=...)`
    with `x: [B, H, W, C]`, returning float32 logits `[B, num_classes]`.

  Raises:
    ValueError: unknown name, bad depth/width/num_classes, or a keyword
      argument the model does not have or that the name already fixes.
  """
  if not isinstance(name, str):
    raise _unknown_name_error(name)
  model_cls, fixed = _resolve(name)

  settable = {f.name for f in dataclasses.fields(model_cls) if f.init} - {"parent", "name"}
  settable -= fixed.keys() | {"num_classes"}
  for key in kwargs:
    if key in fixed:
      raise ValueError(
          f"{key}={kwargs[key]!r} conflicts with model name {name!r}, "
          f"which sets {key}={fixed[key]!r}."
      )
    if key not in settable:
      raise ValueError(
          f"{model_cls.__name__} ({name!r}) has no attribute {key!r}; "
          f"settable attributes: {', '.join(sorted(settable))}."
      )
  try:
    return model_cls(num_classes=num_classes, **fixed, **kwargs)
  except ValueError as error:
    raise ValueError(f"Bad model name or arguments for {name!r}: {error}") from error
