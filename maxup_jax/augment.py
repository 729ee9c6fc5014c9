"""Random perturbations P(.|x) of image batches, driven by one PRNG key per example.

MaxUp draws m i.i.d. copies x'_1..x'_m ~ P(.|x) of every example and trains on
the worst. For the worst copy to be reproducible (`maxup_loss` re-evaluates
the winning key), every augmentation here is a pure function of per-example
keys::

    aug(keys, images, labels) -> (images, labels)

    keys:   [B] typed keys (`jax.random.key`) or [B, 2] raw uint32 keys
            (`jax.random.PRNGKey`); all randomness of example i comes from
            keys[i].
    images: [B, H, W, C] floating point (`gaussian_noise`, `mixup`, `chain`
            and `identity` take any [B, ...], e.g. feature vectors [B, D]).
    labels: [B] integer classes, [B, K] soft / one-hot targets, or `None` for
            augmentations that leave labels alone.

Output example i depends only on keys[i] and the input batch, so the same key
gives the same copy. Mixing augmentations (`cutmix`, `mixup`) read their
partner image from the batch they are given; inside `chain`, put them first,
so that the partner is an un-augmented example and copy i still depends only
on keys[i] and the input batch (otherwise it also depends on the partner's
key, which MaxUp's gradient pass replaces with the partner's own winner).

Factories (`gaussian_noise`, `cutout`, `random_crop_flip`, `cutmix`, `mixup`,
`chain`, `identity`) return such callables, like optax's transformations.
They are jittable and run entirely on device. The per-example primitives
they are built from (`random_center`, `clipped_box`, `box_mask`,
`cutout_mask`, `cutmix_box`, `symmetric_beta`, `random_partner`) are exposed
to check geometry.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Protocol

import chex
import jax
import jax.numpy as jnp
import numpy as np

from maxup_jax import _checks, _sharding

Array = jax.Array

# Why the int arguments cannot be traced, as their error messages say: they fix array shapes (a
# mask's size, a padding, a one-hot width).
_SHAPE_INT = "it fixes array shapes"


class Augmentation(Protocol):
  """A batch transformation driven by one PRNG key per example.

  What the factories of this module return; see the module docstring for the
  shapes.
  """

  def __call__(
      self, keys: Array, images: Array, labels: Array | None
  ) -> tuple[Array, Array | None]:
    """Perturbs example i of `images` (and its label) with `keys[i]` alone."""
    ...


class Box(NamedTuple):
  """A half-open pixel rectangle [top, bottom) x [left, right), int32 scalars.

  Coordinates are already clipped to the image, so the box may be smaller
  than requested, or empty.
  """

  top: Array
  left: Array
  bottom: Array
  right: Array

  @property
  def area(self) -> Array:
    return (self.bottom - self.top) * (self.right - self.left)


# --------------------------------------------------------------------------
# Per-example primitives.


def random_center(key: Array, height: int, width: int) -> Array:
  """A pixel drawn uniformly from the image: int32 `[cy, cx]` in [0,H) x [0,W)."""
  _checks.check_int("height", height, 1, reason=_SHAPE_INT)
  _checks.check_int("width", width, 1, reason=_SHAPE_INT)
  return jax.random.randint(key, (2,), 0, jnp.array([height, width]))


def clipped_box(
    center: Array, box_height, box_width, height: int, width: int
) -> Box:
  """The box of the given size around `center`, clipped to the H x W image.

  Rows span [cy - box_height // 2, cy - box_height // 2 + box_height), and
  columns likewise, before clipping to [0, H) and [0, W). `box_height` and
  `box_width` may be traced integers.
  """
  cy, cx = center[0], center[1]
  top = cy - box_height // 2
  left = cx - box_width // 2
  return Box(
      top=jnp.clip(top, 0, height).astype(jnp.int32),
      left=jnp.clip(left, 0, width).astype(jnp.int32),
      bottom=jnp.clip(top + box_height, 0, height).astype(jnp.int32),
      right=jnp.clip(left + box_width, 0, width).astype(jnp.int32),
  )


def box_mask(box: Box, height: int, width: int) -> Array:
  """Boolean `[H, W]` mask, True on the pixels inside `box`."""
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return (
      (rows >= box.top) & (rows < box.bottom)
      & (cols >= box.left) & (cols < box.right)
  )


def cutout_mask(key: Array, height: int, width: int, length: int) -> Array:
  """Boolean `[H, W]` mask of one Cutout hole (DeVries & Taylor, 2017).

  The hole is the `length` x `length` square around
  `random_center(key, height, width)`, clipped at the borders, so near an
  edge only part of it lies inside the image.
  """
  _checks.check_int("length", length, 1, reason=_SHAPE_INT)
  center = random_center(key, height, width)
  return box_mask(clipped_box(center, length, length, height, width), height, width)


def symmetric_beta(key: Array, alpha: float) -> Array:
  r"""A float32 scalar lambda ~ Beta(alpha, alpha).

  .. math::
    \lambda = \frac{G_1}{G_1 + G_2} = \mathrm{sigmoid}(\log G_1 - \log G_2),
    \qquad G_1, G_2 \sim \mathrm{Gamma}(\alpha)

  Like `jax.random.beta`, this works in log space so that small alpha does
  not underflow to 0 / 0, but it draws both Gamma variates in one call, so
  XLA compiles one rejection sampler instead of two.
  """
  _checks.check_real("alpha", alpha, 0, exclusive=True)
  log_gammas = jax.random.loggamma(key, jnp.full((2,), alpha, jnp.float32))
  return jax.nn.sigmoid(log_gammas[0] - log_gammas[1])


def cutmix_box(key: Array, height: int, width: int, alpha: float) -> tuple[Box, Array]:
  r"""The pasted box of CutMix (Yun et al., 2019) and the kept-area fraction.

  .. math::
    \lambda_0 \sim \mathrm{Beta}(\alpha, \alpha), \quad
    h = \lfloor H \sqrt{1 - \lambda_0} \rfloor, \quad
    w = \lfloor W \sqrt{1 - \lambda_0} \rfloor

  The h x w box is centred on a uniform pixel and clipped at the borders
  (`clipped_box`), so its area can fall short of (1 - lambda_0) H W; the
  returned lambda is recomputed from what remains:
  lambda = 1 - area(box) / (H W), the fraction of the image that is kept.
  Unclipped, the box is exactly h x w (the reference code of Yun et al. ends
  it at c + h // 2, one pixel short for odd h); lambda matches the box
  either way.

  Returns:
    `(box, lam)`: a `Box` and a float32 scalar in [0, 1].
  """
  lam_key, center_key = jax.random.split(key)
  lam0 = symmetric_beta(lam_key, alpha)
  cut_ratio = jnp.sqrt(1.0 - lam0)
  box_height = jnp.floor(height * cut_ratio).astype(jnp.int32)
  box_width = jnp.floor(width * cut_ratio).astype(jnp.int32)
  center = random_center(center_key, height, width)
  box = clipped_box(center, box_height, box_width, height, width)
  lam = 1.0 - box.area.astype(jnp.float32) / (height * width)
  return box, lam


def random_partner(key: Array, batch_size: int) -> Array:
  """A batch index drawn uniformly from [0, batch_size), int32 scalar.

  The example itself is a possible partner; mixing an example with itself
  leaves it (and its label) unchanged.
  """
  _checks.check_int("batch_size", batch_size, 1, reason=_SHAPE_INT)
  return jax.random.randint(key, (), 0, batch_size)


# --------------------------------------------------------------------------
# Augmentations.


def identity() -> Augmentation:
  """The augmentation that returns its inputs: MaxUp reduces to plain ERM."""

  def apply(keys, images, labels):
    _check_batch(keys, images, labels, spatial=False)
    return images, labels

  return apply


def gaussian_noise(sigma: float) -> Augmentation:
  r"""Isotropic Gaussian perturbation, P(.|x) = N(x, sigma^2 I).

  .. math::  x' = x + \sigma \varepsilon, \qquad \varepsilon \sim N(0, I)

  The noise is added in whatever space the images are in. For Gaussian
  smoothing and certified robustness (Cohen et al., 2019; the paper's
  MaxUp+Gauss), sigma is a radius in [0, 1] pixel space, so apply this
  before normalisation. The noise is drawn and added in (at least) float32
  and the result is cast back to the images' dtype. Labels pass through.
  Inputs may be any `[B, ...]` floating-point array, not only images.

  Args:
    sigma: standard deviation, a Python number >= 0; 0 is the identity.
  """
  _checks.check_real("sigma", sigma, 0)

  def perturb(key, image):
    compute_dtype = jnp.promote_types(image.dtype, jnp.float32)
    noise = jax.random.normal(key, image.shape, compute_dtype)
    return (image.astype(compute_dtype) + sigma * noise).astype(image.dtype)

  def apply(keys, images, labels):
    _check_batch(keys, images, labels, spatial=False)
    return jax.vmap(perturb)(keys, images), labels

  return apply


def cutout(length: int, fill=0.0) -> Augmentation:
  """Cutout (DeVries & Taylor, 2017): one square hole per image.

  Example i becomes `where(cutout_mask(keys[i], H, W, length), fill, x_i)`
  over all channels: a `length` x `length` square around a uniform pixel,
  clipped at the borders. In the paper's CIFAR pipeline (mirror + crop, then
  normalise, then Cutout) it is applied after normalisation, so fill=0 is
  the mean colour. Labels pass through.

  Args:
    length: side of the square, a positive Python int (16 for CIFAR-10, 8
      for CIFAR-100 in DeVries & Taylor).
    fill: value of the hole: a scalar or one value per channel, shape [C].
  """
  _checks.check_int("length", length, 1, reason=_SHAPE_INT)
  _check_fill(fill)

  def apply(keys, images, labels):
    _, height, width, channels = _check_batch(keys, images, labels)
    fill_value = _fill_value(fill, channels, images.dtype)
    masks = jax.vmap(lambda k: cutout_mask(k, height, width, length))(keys)
    return jnp.where(masks[..., None], fill_value, images), labels

  return apply


def random_crop_flip(padding: int = 4, fill=0.0) -> Augmentation:
  """The standard CIFAR augmentation: pad, random H x W crop, random mirror.

  Each image is padded by `padding` pixels of `fill` on every side, an H x W
  window is cut at offsets (dy, dx) drawn uniformly from [0, 2 * padding]^2,
  and the window is flipped left-right with probability 1/2. Labels pass
  through.

  Args:
    padding: a Python int >= 0; 0 leaves only the flip.
    fill: padding value: a scalar or one value per channel, shape [C]. On
      normalised images, `fill = -mean / std` reproduces zero (black)
      padding in pixel space.
  """
  _checks.check_int("padding", padding, 0, reason=_SHAPE_INT)
  _check_fill(fill)

  def crop_flip(key, padded, height, width):
    crop_key, flip_key = jax.random.split(key)
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
    window = jax.lax.dynamic_slice(
        padded, (dy, dx, 0), (height, width, padded.shape[-1])
    )
    flip = jax.random.bernoulli(flip_key)
    return jnp.where(flip, window[:, ::-1], window)

  def apply(keys, images, labels):
    _, height, width, channels = _check_batch(keys, images, labels)
    fill_value = _fill_value(fill, channels, images.dtype)
    # Padding the images themselves keeps their sharding (a broadcast fill
    # would be replicated); the border then takes the fill colour.
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    rows = jnp.arange(height + 2 * padding)[:, None]
    cols = jnp.arange(width + 2 * padding)[None, :]
    border = ((rows < padding) | (rows >= padding + height)
              | (cols < padding) | (cols >= padding + width))
    padded = jnp.where(border[..., None], fill_value, jnp.pad(images, pad))
    crops = jax.vmap(crop_flip, in_axes=(0, 0, None, None))(keys, padded, height, width)
    return crops, labels

  return apply


def cutmix(alpha: float, num_classes: int | None = None) -> Augmentation:
  r"""CutMix (Yun et al., 2019): paste a box from a partner image.

  With `box_key, partner_key = jax.random.split(keys[i])`, example i draws
  `(box, lam) = cutmix_box(box_key, H, W, alpha)` and a partner
  `p = random_partner(partner_key, B)` from the batch, and becomes

  .. math::
    x'_i = (1 - M) \odot x_i + M \odot x_p, \qquad
    y'_i = \lambda y_i + (1 - \lambda) y_p

  where M is the box mask and lambda = 1 - area(box) / (H W) is the fraction
  of x_i that is kept. Every example draws its own partner and box (the
  original draws one lambda and one permutation per batch), so MaxUp's
  copies of an image get different boxes and partners.

  The images may have any dtype, uint8 pixels too: CutMix copies whole
  pixels, so it commutes with a conversion to float, and on a batch sharded
  over devices the partners that cross devices move fewer bytes.

  Args:
    alpha: Beta(alpha, alpha) concentration, > 0 (1.0 in Yun et al.).
    num_classes: K, needed to one-hot integer labels; if given with soft
      labels, their last dimension must equal it.

  Returns:
    An augmentation whose labels are always soft, `[B, K]`, floating point.
  """
  _checks.check_real("alpha", alpha, 0, exclusive=True)
  _check_num_classes(num_classes)

  def draw(key, batch_size, height, width):
    box_key, partner_key = jax.random.split(key)
    box, lam = cutmix_box(box_key, height, width, alpha)
    return random_partner(partner_key, batch_size), box, lam

  def apply(keys, images, labels):
    batch_size, height, width, _ = _check_batch(keys, images, labels, floating=False)
    soft = _soft_labels(labels, num_classes, "cutmix")
    partner, box, lam = _per_example(
        lambda key: draw(key, batch_size, height, width), keys)
    masks = jax.vmap(box_mask, in_axes=(0, None, None))(box, height, width)
    mixed = jnp.where(masks[..., None], _sharding.take_rows(images, partner), images)
    return mixed, _mix_labels(soft, partner, lam)

  return apply


def mixup(alpha: float, num_classes: int | None = None) -> Augmentation:
  r"""Mixup (Zhang et al., 2018): convex combination with a partner example.

  With `lam_key, partner_key = jax.random.split(keys[i])`, example i draws
  `lam = symmetric_beta(lam_key, alpha)` and a partner
  `p = random_partner(partner_key, B)`, and becomes

  .. math::
    x'_i = \lambda x_i + (1 - \lambda) x_p, \qquad
    y'_i = \lambda y_i + (1 - \lambda) y_p.

  Lambda and partner are per example (the original draws one lambda and
  one permutation per batch). Mixing is done in float32 and cast back.
  Inputs may be any `[B, ...]` floating-point array, not only images.

  Args:
    alpha: Beta(alpha, alpha) concentration, > 0.
    num_classes: K, needed to one-hot integer labels; if given with soft
      labels, their last dimension must equal it.

  Returns:
    An augmentation whose labels are always soft, `[B, K]`, floating point.
  """
  _checks.check_real("alpha", alpha, 0, exclusive=True)
  _check_num_classes(num_classes)

  def draw(key, batch_size):
    lam_key, partner_key = jax.random.split(key)
    lam = symmetric_beta(lam_key, alpha)
    return random_partner(partner_key, batch_size), lam

  def apply(keys, images, labels):
    batch_size = _check_batch(keys, images, labels, spatial=False)[0]
    soft = _soft_labels(labels, num_classes, "mixup")
    partner, lam = _per_example(lambda key: draw(key, batch_size), keys)
    compute_dtype = jnp.promote_types(images.dtype, jnp.float32)
    weight = lam.astype(compute_dtype).reshape((batch_size,) + (1,) * (images.ndim - 1))
    own = images.astype(compute_dtype)
    mixed = weight * own + (1 - weight) * _sharding.take_rows(own, partner)
    return mixed.astype(images.dtype), _mix_labels(soft, partner, lam)

  return apply


def chain(*augmentations: Augmentation) -> Augmentation:
  """Applies `augmentations` in order, each with its own per-example subkey.

  Example i's key is split into `len(augmentations)` subkeys,
  `jax.vmap(lambda k: jax.random.split(k, n))(keys)`, and the j-th
  augmentation receives subkey j of every example. E.g. the CIFAR Cutout
  pipeline on normalised images is
  `chain(random_crop_flip(4, fill=-mean / std), cutout(16))`.
  Put mixing augmentations first (see the module docstring).
  """
  for index, aug in enumerate(augmentations):
    if not callable(aug):
      raise TypeError(
          f"chain takes augmentations, callables (keys, images, labels) -> "
          f"(images, labels); argument {index} is {aug!r}."
      )
  count = len(augmentations)

  def apply(keys, images, labels):
    _check_batch(keys, images, labels, spatial=False, floating=False)
    if not count:
      return images, labels
    subkeys = jax.vmap(lambda k: jax.random.split(k, count))(keys)
    for index, aug in enumerate(augmentations):
      images, labels = aug(subkeys[:, index], images, labels)
    return images, labels

  return apply


def normalize(images: Array, mean, std) -> Array:
  """Per-channel standardisation `(images - mean) / std`.

  Args:
    images: `[..., C]` floating point.
    mean, std: scalars or `[C]`; `std` > 0.
  """
  images = jnp.asarray(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(
        f"normalize expects floating-point images, got {images.dtype}; convert "
        "first, e.g. images.astype(jnp.float32) / 255."
    )
  channels = images.shape[-1] if images.ndim else None
  for name, value in (("mean", mean), ("std", std)):
    shape = np.shape(value)
    if shape not in ((), (channels,)):
      raise ValueError(
          f"{name} must be a scalar or hold one value per channel, shape "
          f"({channels},); got shape {shape}."
      )
  # Only concrete values can be checked; traced ones are the caller's concern.
  if isinstance(std, (numbers.Real, np.ndarray, list, tuple)) and np.any(
      np.asarray(std) <= 0
  ):
    raise ValueError(f"std must be > 0 in every channel, got {std}.")
  mean = jnp.asarray(mean, images.dtype)
  std = jnp.asarray(std, images.dtype)
  return (images - mean) / std


# --------------------------------------------------------------------------
# Helpers.


def _per_example(draw, keys: Array):
  """`jax.vmap(draw)(keys)`: the per-example random draws of a mixing augmentation.

  Under explicit sharding, JAX's Gamma sampler (behind the Beta draws) fails
  to batch over sharded keys, so the draws, a few scalars per example, are
  made on every device from the whole batch's keys and then split like the
  keys. Elsewhere this is just the vmap.
  """
  axes = _sharding.explicit_batch_axes(keys)
  if axes is None:
    return jax.vmap(draw)(keys)
  draws = jax.vmap(draw)(jax.sharding.reshard(keys, jax.sharding.PartitionSpec()))
  return jax.tree.map(lambda x: _sharding.shard_axis_like(x, 0, axes), draws)


def _mix_labels(soft: Array, partner: Array, lam: Array) -> Array:
  weight = lam.astype(jnp.promote_types(soft.dtype, jnp.float32))[:, None]
  mixed = weight * soft + (1 - weight) * _sharding.take_rows(soft, partner)
  chex.assert_equal_shape((mixed, soft))
  return mixed.astype(soft.dtype)


def _soft_labels(labels, num_classes: int | None, name: str) -> Array:
  """Integer `[B]` labels as one-hot float32 `[B, K]`; soft `[B, K]` as given."""
  if labels is None:
    raise ValueError(f"{name} mixes labels, so labels must not be None.")
  if jnp.issubdtype(labels.dtype, jnp.integer) and labels.ndim == 1:
    if num_classes is None:
      raise ValueError(
          f"{name} got integer labels of shape {labels.shape}; pass "
          f"num_classes to {name}(...) so they can be one-hot encoded, or "
          "pass soft labels of shape [B, K]."
      )
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if jnp.issubdtype(labels.dtype, jnp.floating) and labels.ndim == 2:
    if num_classes is not None and labels.shape[1] != num_classes:
      raise ValueError(
          f"{name} was built with num_classes={num_classes} but got soft "
          f"labels with {labels.shape[1]} classes (shape {labels.shape})."
      )
    return labels
  raise ValueError(
      f"{name} needs integer labels of shape [B] or floating-point soft labels "
      f"of shape [B, K]; got dtype {labels.dtype} and shape {labels.shape}."
  )


def _check_batch(keys, images, labels, spatial: bool = True,
                 floating: bool = True) -> tuple[int, ...]:
  """Checks one key per example and images (floating point if `floating`); returns their shape.

  Images must be `[B, H, W, C]` if `spatial`, else any `[B, ...]`.
  """
  if not hasattr(images, "shape") or not hasattr(images, "dtype"):
    raise TypeError(f"images must be an array, got {type(images).__name__}.")
  if spatial and images.ndim != 4:
    raise ValueError(
        f"images must have shape [B, H, W, C], got shape {images.shape}."
    )
  if images.ndim == 0:
    raise ValueError("images must have a leading batch dimension, got a scalar.")
  if floating and not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(
        f"images must be floating point, got {images.dtype}; convert first, "
        "e.g. images.astype(jnp.float32) / 255."
    )
  batch_size = images.shape[0]
  if not hasattr(keys, "shape") or not hasattr(keys, "dtype"):
    raise TypeError(f"keys must be an array of PRNG keys, got {type(keys).__name__}.")
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys_ok = keys.shape == (batch_size,)
  else:
    keys_ok = keys.dtype == jnp.uint32 and keys.ndim == 2 and keys.shape[0] == batch_size
  if not keys_ok:
    raise ValueError(
        f"keys must hold one PRNG key per example: typed keys of shape "
        f"({batch_size},) (jax.random.split(jax.random.key(seed), {batch_size})) "
        f"or raw uint32 keys of shape ({batch_size}, 2); got dtype {keys.dtype} "
        f"and shape {keys.shape} for images of shape {images.shape}."
    )
  if labels is not None and (np.ndim(labels) == 0 or np.shape(labels)[0] != batch_size):
    raise ValueError(
        f"labels must have leading batch dimension {batch_size} like images "
        f"{images.shape}; got shape {np.shape(labels)}."
    )
  return images.shape


def _check_fill(fill) -> None:
  if np.ndim(fill) > 1:
    raise ValueError(
        f"fill must be a scalar or hold one value per channel, shape [C]; got "
        f"shape {np.shape(fill)}."
    )


def _fill_value(fill, channels: int, dtype) -> Array:
  if np.ndim(fill) == 1 and np.shape(fill)[0] != channels:
    raise ValueError(
        f"fill holds {np.shape(fill)[0]} values but the images have "
        f"{channels} channels."
    )
  return jnp.asarray(fill, dtype)


def _check_num_classes(num_classes) -> None:
  if num_classes is not None:
    _checks.check_int("num_classes", num_classes, 1, reason=_SHAPE_INT)
