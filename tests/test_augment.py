"""Tests of the per-example augmentations: geometry, statistics, keys, MaxUp."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from maxup_jax import augment
from maxup_jax.losses import softmax_cross_entropy
from maxup_jax.maxup import maxup_loss

BATCH, HEIGHT, WIDTH, CHANNELS = 8, 7, 9, 2
CLASSES = BATCH  # One class per example, so mixed labels reveal the partner.


def _keys(seed=0, batch=BATCH):
  return jax.random.split(jax.random.key(seed), batch)


def _images(seed=1, batch=BATCH, height=HEIGHT, width=WIDTH):
  return jax.random.normal(jax.random.key(seed), (batch, height, width, CHANNELS))


def _labels(batch=BATCH):
  return jnp.arange(batch, dtype=jnp.int32)


def _np_square_mask(cy, cx, length, height, width):
  """Brute force: pixel (r, c) is in the hole iff it lies in the unclipped square."""
  mask = np.zeros((height, width), bool)
  start_y, start_x = cy - length // 2, cx - length // 2
  for r in range(height):
    for c in range(width):
      mask[r, c] = start_y <= r < start_y + length and start_x <= c < start_x + length
  return mask


# Every augmentation, with labels it accepts.
AUGMENTATIONS = {
    "identity": augment.identity(),
    "gaussian_noise": augment.gaussian_noise(0.3),
    "cutout": augment.cutout(3),
    "random_crop_flip": augment.random_crop_flip(2),
    "cutmix": augment.cutmix(1.0, num_classes=CLASSES),
    "mixup": augment.mixup(0.4, num_classes=CLASSES),
    "chain": augment.chain(augment.random_crop_flip(1), augment.cutout(3)),
}
RANDOM_AUGMENTATIONS = {k: v for k, v in AUGMENTATIONS.items() if k != "identity"}
# Compilation dominates the run time, so tests run eagerly on the shapes above
# (eager calls share their compiled operations) and jitted results come from
# one compilation of all augmentations together.


@functools.cache
def _jitted_outputs(key_kind):
  """Every augmentation's output on the shared batch, from one jitted call."""
  keys = _keys() if key_kind == "typed" else _raw_keys()
  run = jax.jit(lambda *args: {n: aug(*args) for n, aug in AUGMENTATIONS.items()})
  return run(keys, _images(), _labels())


def _raw_keys(seed=0):
  """Raw uint32 keys [B, 2] holding the same bits as `_keys(seed)`."""
  return jax.random.key_data(_keys(seed))


class CutoutTest(parameterized.TestCase):

  @parameterized.parameters(4, 5)
  def test_mask_is_the_clipped_square_around_the_centre(self, length):
    clipped = 0
    for key in _keys(batch=64):
      cy, cx = np.asarray(augment.random_center(key, HEIGHT, WIDTH))
      expected = _np_square_mask(cy, cx, length, HEIGHT, WIDTH)
      np.testing.assert_array_equal(
          augment.cutout_mask(key, HEIGHT, WIDTH, length), expected
      )
      clipped += expected.sum() < length * length
    self.assertGreater(clipped, 0)  # Some holes crossed a border.

  @parameterized.parameters(
      # (cy, cx) -> (top, left, bottom, right) for a 5 x 5 hole in 7 x 9.
      ((0, 0), (0, 0, 3, 3)),
      ((6, 8), (4, 6, 7, 9)),
      ((3, 4), (1, 2, 6, 7)),
  )
  def test_box_clipped_at_corners(self, center, expected):
    box = augment.clipped_box(jnp.array(center), 5, 5, HEIGHT, WIDTH)
    self.assertEqual(tuple(int(v) for v in box), expected)
    mask = augment.box_mask(box, HEIGHT, WIDTH)
    np.testing.assert_array_equal(mask, _np_square_mask(*center, 5, HEIGHT, WIDTH))
    self.assertEqual(int(box.area), int(mask.sum()))

  def test_random_center_covers_every_pixel(self):
    centers = jax.vmap(lambda k: augment.random_center(k, 3, 4))(_keys(batch=400))
    pixels = {tuple(c) for c in np.asarray(centers)}
    self.assertEqual(pixels, {(r, c) for r in range(3) for c in range(4)})

  @parameterized.parameters(0.0, -1.5)
  def test_only_the_hole_changes(self, fill):
    keys, images = _keys(), _images()
    out, labels = augment.cutout(4, fill=fill)(keys, images, _labels())
    masks = np.stack([augment.cutout_mask(k, HEIGHT, WIDTH, 4) for k in keys])
    expected = np.where(masks[..., None], fill, images)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(labels, _labels())

  def test_per_channel_fill(self):
    fill = jnp.array([-1.0, 2.0])
    out, _ = augment.cutout(4, fill=fill)(_keys(), _images(), None)
    masks = jax.vmap(lambda k: augment.cutout_mask(k, HEIGHT, WIDTH, 4))(_keys())
    chex.assert_trees_all_equal(out[masks], jnp.broadcast_to(fill, out[masks].shape))


class CutMixTest(parameterized.TestCase):

  def test_box_lambda_is_kept_area_fraction(self):
    height, width = HEIGHT, WIDTH
    # 200 boxes in batches of the shared shape, which reuses compiled code.
    draw = jax.vmap(lambda k: augment.cutmix_box(k, height, width, 1.0))
    boxes, lams = jax.tree.map(
        lambda *xs: np.concatenate(xs), *[draw(_keys(seed)) for seed in range(25)]
    )
    area = (boxes.bottom - boxes.top) * (boxes.right - boxes.left)
    chex.assert_trees_all_close(lams, 1 - area / (height * width), atol=1e-6)
    self.assertTrue(np.all((0 <= boxes.top) & (boxes.top <= boxes.bottom)))
    self.assertTrue(np.all(boxes.bottom <= height))
    self.assertTrue(np.all((0 <= boxes.left) & (boxes.left <= boxes.right)))
    self.assertTrue(np.all(boxes.right <= width))
    # Boxes off the borders keep the image's aspect ratio, h / H ~ w / W.
    interior = (boxes.top > 0) & (boxes.left > 0) & (boxes.bottom < height) & (
        boxes.right < width
    )
    self.assertGreater(int(interior.sum()), 5)
    h = (boxes.bottom - boxes.top)[interior] / height
    w = (boxes.right - boxes.left)[interior] / width
    np.testing.assert_array_less(np.abs(h - w), 1 / height + 1 / width)
    # lambda_0 ~ U(0, 1) for alpha = 1, so without clipping half the boxes
    # would cover over half the image; clipping only makes boxes smaller.
    self.assertBetween(float(np.mean(lams < 0.5)), 0.1, 0.5)

  def test_box_holds_partner_pixels_and_labels_mix_by_area(self):
    images = _images()
    np_images = np.asarray(images)
    eye = np.eye(CLASSES)

    @jax.vmap
    def draw(key):  # The documented use of each example's key.
      box_key, partner_key = jax.random.split(key)
      box, lam = augment.cutmix_box(box_key, HEIGHT, WIDTH, 1.0)
      mask = augment.box_mask(box, HEIGHT, WIDTH)
      return mask, lam, augment.random_partner(partner_key, BATCH)

    mixed_count = 0
    for seed in range(3):
      keys = _keys(seed)
      out, soft = AUGMENTATIONS["cutmix"](keys, images, _labels())
      chex.assert_shape(soft, (BATCH, CLASSES))
      chex.assert_trees_all_close(soft.sum(-1), jnp.ones(BATCH), atol=1e-6)
      out, soft = np.asarray(out), np.asarray(soft)
      masks, lams, partners = map(np.asarray, draw(keys))
      for i, (mask, lam, partner) in enumerate(zip(masks, lams, partners)):
        np.testing.assert_array_equal(out[i][mask], np_images[partner][mask])
        np.testing.assert_array_equal(out[i][~mask], np_images[i][~mask])
        np.testing.assert_allclose(
            soft[i], lam * eye[i] + (1 - lam) * eye[partner], atol=1e-6
        )
        if partner != i and mask.any():
          mixed_count += 1
          # Seen from outside: the changed pixels are a rectangle whose area
          # fraction is 1 - (weight of the example's own class).
          changed = np.any(out[i] != np_images[i], axis=-1)
          rows, cols = np.nonzero(changed)
          self.assertEqual(changed.sum(), (np.ptp(rows) + 1) * (np.ptp(cols) + 1))
          np.testing.assert_allclose(changed.mean(), 1 - soft[i, i], atol=1e-6)
    self.assertGreater(mixed_count, BATCH)

  def test_one_hot_labels_equal_integer_labels(self):
    args = (_keys(), _images())
    from_int = AUGMENTATIONS["cutmix"](*args, _labels())
    from_soft = augment.cutmix(1.0)(*args, jax.nn.one_hot(_labels(), CLASSES))
    chex.assert_trees_all_close(from_int, from_soft, atol=1e-6)

  def test_integer_labels_need_num_classes(self):
    with self.assertRaisesRegex(ValueError, "num_classes"):
      augment.cutmix(1.0)(_keys(), _images(), _labels())

  def test_symmetric_beta_moments(self):
    alpha = 0.3
    lams = np.asarray(jax.jit(jax.vmap(lambda k: augment.symmetric_beta(k, alpha)))(
        _keys(batch=20000)
    ))
    self.assertTrue(np.all((0 <= lams) & (lams <= 1)))
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); std of the estimates
    # is below 0.004 here.
    self.assertLess(abs(lams.mean() - 0.5), 0.015)
    self.assertLess(abs(lams.var() - 1 / (4 * (2 * alpha + 1))), 0.01)

  def test_soft_labels_must_match_num_classes(self):
    with self.assertRaisesRegex(ValueError, "num_classes=3.*8 classes"):
      augment.cutmix(1.0, num_classes=3)(_keys(), _images(), jnp.eye(BATCH))


class MixupTest(parameterized.TestCase):

  def test_convex_combination_of_example_and_partner(self):
    images = np.asarray(_images())
    mixed_count = 0
    for seed in range(3):
      out, soft = AUGMENTATIONS["mixup"](_keys(seed), images, _labels())
      chex.assert_shape(soft, (BATCH, CLASSES))
      chex.assert_trees_all_close(soft.sum(-1), jnp.ones(BATCH), atol=1e-6)
      out, soft = np.asarray(out), np.asarray(soft)
      self.assertTrue(np.all(soft >= 0))
      for i in range(BATCH):
        # One class per example: the label spells out lambda and the partner.
        others = soft[i].copy()
        lam = others[i]
        others[i] = 0
        if others.max() == 0:  # Mixed with itself.
          chex.assert_trees_all_close(out[i], images[i], atol=1e-6)
          continue
        mixed_count += 1
        partner = int(np.argmax(others))
        chex.assert_trees_all_close(
            out[i], lam * images[i] + (1 - lam) * images[partner], atol=1e-5
        )
    self.assertGreater(mixed_count, BATCH)

  def test_integer_labels_need_num_classes(self):
    with self.assertRaisesRegex(ValueError, "num_classes"):
      augment.mixup(1.0)(_keys(), _images(), _labels())

  def test_feature_vectors(self):
    features = jnp.arange(BATCH * 3, dtype=jnp.float32).reshape(BATCH, 3)
    out, soft = AUGMENTATIONS["mixup"](_keys(), features, _labels())
    # Each row is its label-weighted mix of the input rows.
    chex.assert_trees_all_close(out, soft @ features, rtol=1e-5)

  def test_keeps_bfloat16_images_and_soft_label_dtype(self):
    images = _images().astype(jnp.bfloat16)
    soft = jax.nn.softmax(jax.random.normal(jax.random.key(3), (BATCH, CLASSES)))
    out, mixed = AUGMENTATIONS["mixup"](_keys(), images, soft.astype(jnp.bfloat16))
    self.assertEqual(out.dtype, jnp.bfloat16)
    self.assertEqual(mixed.dtype, jnp.bfloat16)
    chex.assert_trees_all_close(
        mixed.astype(jnp.float32).sum(-1), jnp.ones(BATCH), atol=2e-2
    )


class RandomCropFlipTest(parameterized.TestCase):

  @parameterized.parameters((1, 0.0), (2, -3.0))
  def test_output_is_a_window_of_the_padded_image(self, padding, fill):
    batch = 200
    keys, images = _keys(batch=batch), _images(batch=batch, height=4, width=5)
    out, _ = augment.random_crop_flip(padding, fill=fill)(keys, images, None)
    out = np.asarray(out)
    padded = np.pad(
        np.asarray(images),
        ((0, 0), (padding, padding), (padding, padding), (0, 0)),
        constant_values=fill,
    )
    seen = set()
    for i in range(batch):
      matches = [
          (dy, dx, flip)
          for dy in range(2 * padding + 1)
          for dx in range(2 * padding + 1)
          for flip in (False, True)
          if np.array_equal(
              out[i],
              (lambda w: w[:, ::-1] if flip else w)(padded[i, dy:dy + 4, dx:dx + 5]),
          )
      ]
      self.assertLen(matches, 1)
      seen.add(matches[0])
    # Every offset in [0, 2p]^2 occurs, with and without the flip (for p = 1,
    # 200 draws miss one of the 18 outcomes with probability ~2e-4).
    if padding == 1:
      self.assertLen(seen, 18)

  def test_no_padding_only_flips(self):
    images = np.asarray(_images())
    out, _ = augment.random_crop_flip(0)(_keys(), images, None)
    out = np.asarray(out)
    for i in range(BATCH):
      self.assertTrue(
          np.array_equal(out[i], images[i]) or np.array_equal(out[i], images[i, :, ::-1])
      )

  def test_per_channel_fill(self):
    zeros = jnp.zeros((BATCH, 3, 3, CHANNELS))
    fill = jnp.array([5.0, -5.0])
    out, _ = augment.random_crop_flip(2, fill=fill)(_keys(), zeros, None)
    values = {tuple(v) for v in np.asarray(out).reshape(-1, CHANNELS)}
    self.assertEqual(values, {(0.0, 0.0), (5.0, -5.0)})


class GaussianNoiseTest(parameterized.TestCase):

  def test_noise_statistics(self):
    sigma = 0.5
    images = jnp.full((4, 16, 16, 3), 2.0)
    out, _ = augment.gaussian_noise(sigma)(_keys(batch=4), images, None)
    noise = np.asarray(out - images)
    count = noise.size
    self.assertLess(abs(noise.mean()), 5 * sigma / np.sqrt(count))
    self.assertLess(abs(noise.std() / sigma - 1), 0.05)
    # Examples are perturbed independently, not all by the same noise.
    self.assertLess(abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]), 0.1)

  def test_feature_vectors(self):
    features = jnp.zeros((BATCH, 3))
    out, _ = augment.gaussian_noise(1.0)(_keys(), features, None)
    chex.assert_shape(out, (BATCH, 3))
    self.assertGreater(float(jnp.abs(out).min()), 0.0)

  def test_zero_sigma_is_identity(self):
    images = _images()
    out, labels = augment.gaussian_noise(0.0)(_keys(), images, _labels())
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(labels, _labels())


class KeysTest(parameterized.TestCase):

  @parameterized.named_parameters(*RANDOM_AUGMENTATIONS.items())
  def test_same_key_same_copy_different_key_different_copy(self, aug):
    images, labels = _images(), _labels()
    first = aug(_keys(0), images, labels)
    chex.assert_trees_all_equal(first, aug(_keys(0), images, labels))
    other_images, _ = aug(_keys(1), images, labels)
    first, other_images = np.asarray(first[0]), np.asarray(other_images)
    for i in range(BATCH):
      # Tiny images make a coincidence possible for one example, not for all.
      if not np.array_equal(first[i], other_images[i]):
        break
    else:
      self.fail("different keys gave the same copies of every example")

  @parameterized.named_parameters(*AUGMENTATIONS.items())
  def test_example_depends_only_on_its_own_key(self, aug):
    images, labels = _images(), _labels()
    keys = _keys(0)
    changed_keys = keys.at[0].set(jax.random.key(99))
    out = aug(keys, images, labels)
    out_changed = aug(changed_keys, images, labels)
    chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x[1:], out), jax.tree.map(lambda x: x[1:], out_changed)
    )

  @parameterized.named_parameters(*((name, name) for name in AUGMENTATIONS))
  def test_jit_matches_eager(self, name):
    eager = AUGMENTATIONS[name](_keys(), _images(), _labels())
    chex.assert_trees_all_close(eager, _jitted_outputs("typed")[name], atol=1e-6)

  @parameterized.named_parameters(*((name, name) for name in AUGMENTATIONS))
  def test_raw_keys_match_typed_keys(self, name):
    raw = _raw_keys()
    chex.assert_shape(raw, (BATCH, 2))
    self.assertEqual(raw.dtype, jnp.uint32)
    chex.assert_trees_all_close(
        _jitted_outputs("raw")[name], _jitted_outputs("typed")[name], atol=1e-6
    )


class ChainTest(parameterized.TestCase):

  @parameterized.parameters("typed", "raw")
  def test_applies_in_order_with_split_keys(self, key_kind):
    keys = _keys() if key_kind == "typed" else _raw_keys()
    first = augment.random_crop_flip(2, fill=5.0)
    second = augment.cutout(3, fill=-7.0)
    images, labels = _images(), _labels()
    out = augment.chain(first, second)(keys, images, labels)
    subkeys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    expected = second(subkeys[:, 1], *first(subkeys[:, 0], images, labels))
    chex.assert_trees_all_equal(out, expected)
    # Cutout ran last: no hole pixel was shifted, so each hole is intact.
    for image, key in zip(np.asarray(out[0]), subkeys[:, 1]):
      hole = np.asarray(augment.cutout_mask(key, HEIGHT, WIDTH, 3))
      self.assertTrue(np.all(image[hole] == -7.0))

  def test_empty_chain_is_identity(self):
    images, labels = _images(), _labels()
    chex.assert_trees_all_equal(
        augment.chain()(_keys(), images, labels), (images, labels)
    )


class NormalizeTest(parameterized.TestCase):

  def test_per_channel(self):
    images = _images()
    mean, std = jnp.array([0.5, -1.0]), jnp.array([2.0, 0.25])
    chex.assert_trees_all_close(
        augment.normalize(images, mean, std), (images - mean) / std, rtol=1e-6
    )

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "std must be > 0"):
      augment.normalize(_images(), 0.0, [1.0, 0.0])
    with self.assertRaisesRegex(ValueError, r"mean must be .* shape \(2,\)"):
      augment.normalize(_images(), [0.0, 0.0, 0.0], 1.0)


def _linear_loss_fn(aug):
  """Cross-entropy of a linear classifier on augmented images."""

  def loss_fn(params, batch, keys):
    images, labels = aug(keys, batch["x"], batch["y"])
    logits = images.reshape(images.shape[0], -1) @ params["w"] + params["b"]
    return softmax_cross_entropy(logits, labels)

  return loss_fn


def _linear_params():
  w = 0.3 * jax.random.normal(jax.random.key(5), (HEIGHT * WIDTH * CHANNELS, CLASSES))
  return {"w": w, "b": jnp.zeros(CLASSES)}


def _maxup_linear(aug, num_copies, params=None):
  batch = {"x": _images(), "y": _labels()}
  params = _linear_params() if params is None else params
  return maxup_loss(
      _linear_loss_fn(aug), params, batch, jax.random.key(6), num_copies=num_copies
  )


# Every random augmentation, and a pipeline with a mixing augmentation first.
MAXUP_AUGMENTATIONS = dict(
    RANDOM_AUGMENTATIONS,
    mixing_chain=augment.chain(
        augment.cutmix(1.0, num_classes=CLASSES), augment.cutout(3)
    ),
)


@functools.cache
def _jitted_maxup():
  """`maxup_loss` with each augmentation, num_copies=3, in one compilation."""
  run = lambda p: {n: _maxup_linear(aug, 3, p) for n, aug in MAXUP_AUGMENTATIONS.items()}
  return jax.jit(run)(_linear_params())


class MaxUpTest(parameterized.TestCase):

  @parameterized.named_parameters(*((name, name) for name in MAXUP_AUGMENTATIONS))
  def test_composes_with_maxup_loss(self, name):
    loss, aux = _jitted_maxup()[name]
    chex.assert_shape(aux.copy_losses, (3, BATCH))
    # The copies differ, or the max over them would be vacuous.
    self.assertTrue(np.any(np.ptp(np.asarray(aux.copy_losses), axis=0) > 1e-4))
    np.testing.assert_array_equal(aux.selected_copy, np.argmax(aux.copy_losses, axis=0))
    # The gradient pass re-creates each winning copy from its key, so the
    # loss it returns is the max over the copies evaluated in selection.
    chex.assert_trees_all_close(loss, aux.copy_losses.max(axis=0).mean(), rtol=1e-5)

  def test_jit_matches_eager(self):
    # Eager runs compile every operation separately, so only the pipeline
    # holding a mixing and a per-example augmentation runs both ways; each
    # augmentation alone is compared jitted and eager in KeysTest.
    eager_loss, eager_aux = _maxup_linear(MAXUP_AUGMENTATIONS["mixing_chain"], 3)
    jit_loss, jit_aux = _jitted_maxup()["mixing_chain"]
    chex.assert_trees_all_close(eager_loss, jit_loss, rtol=1e-5)
    chex.assert_trees_all_close(eager_aux.copy_losses, jit_aux.copy_losses, rtol=1e-5)
    np.testing.assert_array_equal(eager_aux.selected_copy, jit_aux.selected_copy)


class ErrorsTest(parameterized.TestCase):

  @parameterized.parameters(
      (lambda: augment.gaussian_noise(-0.1), ValueError, "sigma must be >= 0"),
      (lambda: augment.gaussian_noise("0.1"), TypeError, "sigma must be a Python number"),
      (lambda: augment.gaussian_noise(float("nan")), ValueError, "sigma must be finite"),
      (lambda: augment.cutout(0), ValueError, "length must be a positive int"),
      (lambda: augment.cutout(2.5), TypeError, "length must be a Python int"),
      (lambda: augment.cutout(True), TypeError, "length must be a Python int"),
      (lambda: augment.cutout(4, fill=jnp.zeros((2, 2))), ValueError, "fill must be"),
      (lambda: augment.random_crop_flip(-1), ValueError, "padding must be an int >= 0"),
      (lambda: augment.cutmix(0.0), ValueError, "alpha must be > 0"),
      (lambda: augment.cutmix(1.0, num_classes=0), ValueError, "num_classes"),
      (lambda: augment.mixup(-1.0), ValueError, "alpha must be > 0"),
      (lambda: augment.chain(augment.cutout(2), 3), TypeError, "argument 1 is 3"),
  )
  def test_bad_factory_arguments(self, make, error, message):
    with self.assertRaisesRegex(error, message):
      make()

  @parameterized.named_parameters(*AUGMENTATIONS.items())
  def test_bad_keys(self, aug):
    with self.assertRaisesRegex(ValueError, r"one PRNG key per example.*\(8,\)"):
      aug(_keys(batch=BATCH - 1), _images(), _labels())
    with self.assertRaisesRegex(ValueError, "one PRNG key per example"):
      aug(jax.random.key(0), _images(), _labels())

  @parameterized.named_parameters(
      *((name, aug) for name, aug in AUGMENTATIONS.items() if name != "cutmix"))
  def test_bad_images(self, aug):
    with self.assertRaisesRegex(TypeError, "floating point"):
      aug(_keys(), jnp.zeros((BATCH, 4, 4, 3), jnp.uint8), _labels())

  def test_cutmix_of_uint8_pixels_is_cutmix_of_their_floats(self):
    pixels = jax.random.randint(jax.random.key(3), (BATCH, HEIGHT, WIDTH, 3), 0, 256, jnp.uint8)
    cutmix = AUGMENTATIONS["cutmix"]
    mixed, soft = cutmix(_keys(), pixels, _labels())
    mixed_floats, soft_floats = cutmix(_keys(), pixels.astype(jnp.float32) / 255, _labels())
    self.assertEqual(mixed.dtype, jnp.uint8)
    chex.assert_trees_all_equal((mixed.astype(jnp.float32) / 255, soft),
                                (mixed_floats, soft_floats))

  @parameterized.named_parameters(*AUGMENTATIONS.items())
  def test_labels_of_wrong_batch_size(self, aug):
    with self.assertRaisesRegex(ValueError, "leading batch dimension 8"):
      aug(_keys(), _images(), _labels(BATCH - 1))

  @parameterized.named_parameters(
      *((name, AUGMENTATIONS[name]) for name in ("cutout", "random_crop_flip", "cutmix"))
  )
  def test_spatial_augmentations_need_image_batches(self, aug):
    with self.assertRaisesRegex(ValueError, r"\[B, H, W, C\]"):
      aug(_keys(), _images()[..., 0], _labels())

  def test_fill_channel_mismatch(self):
    with self.assertRaisesRegex(ValueError, "3 values but the images have 2"):
      augment.cutout(4, fill=jnp.zeros(3))(_keys(), _images(), None)

  @parameterized.parameters(augment.cutmix, augment.mixup)
  def test_mixing_needs_labels(self, factory):
    aug = factory(1.0, num_classes=CLASSES)
    with self.assertRaisesRegex(ValueError, "labels must not be None"):
      aug(_keys(), _images(), None)
    with self.assertRaisesRegex(ValueError, "integer labels of shape"):
      aug(_keys(), _images(), jnp.zeros((BATCH, 2), jnp.int32))

