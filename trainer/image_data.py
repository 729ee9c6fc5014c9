"""Image datasets: what each one is, and reading it from tfds array_record sources.

Datasets are read with `tfds.data_source` (array_record, random access, no
TensorFlow needed). CIFAR and MNIST are decoded once into memory; ImageNet is
decoded per example with a random-resized crop (train) or a center crop
(eval) to 224x224. All other augmentation happens later, on device, inside
the jitted train step (`maxup_jax.augment`).

The facts the steps need of a dataset (classes, image shape, sizes, the
normalisation statistics) are here too, so that a step can be built, e.g.
compiled for a TPU slice, without reading any data.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import math
import os
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from trainer import core

Batch = dict[str, np.ndarray]

# Datasets small enough to hold decoded in host memory (CIFAR-10 train is
# 50000 * 32 * 32 * 3 bytes = 150 MB).
IN_MEMORY_DATASETS = ('cifar10', 'cifar100', 'mnist')
# Datasets decoded per example, with a crop to a fixed square size.
CROPPED_DATASETS = {'imagenet2012': 224}
# Every dataset `load_dataset` knows.
DATASETS = IN_MEMORY_DATASETS + tuple(CROPPED_DATASETS)


# ---------------------------------------------------------------------------
# What the steps need to know of a dataset.

# Per-channel mean and std of the training images in [0, 1] pixel scale.
DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# The split a run evaluates on; "test" where not named.
EVAL_SPLITS = {"imagenet2012": "validation"}


def eval_split(dataset: str) -> str:
  """The split runs on `dataset` are evaluated (and certified) on."""
  return EVAL_SPLITS.get(dataset, "test")


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  """What the model, the steps and the schedule need to know of a dataset.

  Attributes:
    num_classes: label classes.
    image_shape: (H, W, C) of the images the input pipeline yields.
    num_train_examples: examples in the training set a run walks through.
    num_eval_examples: examples in the evaluation split (test, or ImageNet's validation).
  """

  num_classes: int
  image_shape: tuple[int, int, int]
  num_train_examples: int
  num_eval_examples: int


# The full training splits as the input pipeline yields them (ImageNet as its
# 224 x 224 crops), for building the steps without reading any data
# (`trainer.compile_report`); a run uses the facts of the data it loaded.
PUBLISHED_DATASET_FACTS = {
    "cifar10": DatasetFacts(10, (32, 32, 3), 50_000, 10_000),
    "cifar100": DatasetFacts(100, (32, 32, 3), 50_000, 10_000),
    "mnist": DatasetFacts(10, (28, 28, 1), 60_000, 10_000),
    "imagenet2012": DatasetFacts(1000, (224, 224, 3), 1_281_167, 50_000),
}


def published_dataset_facts(dataset: str, num_train_examples: int = 0,
                            num_eval_examples: int = 0) -> DatasetFacts:
  """`dataset`'s published facts, cut to `num_train_examples` and `num_eval_examples`
  where they are not 0, as `load_dataset` cuts them."""
  facts = PUBLISHED_DATASET_FACTS[dataset]
  if num_train_examples:
    facts = dataclasses.replace(
        facts, num_train_examples=min(facts.num_train_examples, num_train_examples))
  if num_eval_examples:
    facts = dataclasses.replace(
        facts, num_eval_examples=min(facts.num_eval_examples, num_eval_examples))
  return facts


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


# ImageNet eval crop: the central 224/256 of the shorter side, i.e. "resize the
# shorter side to 256, then take the central 224x224".
CENTER_CROP_FRACTION = 224 / 256
# Inception-style random-resized-crop ranges (fraction of the image area and
# width / height of the crop).
RANDOM_CROP_AREA_RANGE = (0.08, 1.0)
RANDOM_CROP_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)

# Examples decoded per `__getitems__` call while filling the in-memory cache.
_CACHE_CHUNK_SIZE = 1000


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not prepared (in array_record format) under the data dir."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> str:
  """The tfds data dir: `data_dir`, else $TFDS_DATA_DIR, else tfds's default."""
  if data_dir is None:
    data_dir = os.environ.get('TFDS_DATA_DIR') or tfds.core.constants.DATA_DIR
  return os.path.expanduser(os.fspath(data_dir))




# --------------------------------------------------------------------------
# Decoding and cropping (ImageNet).
# --------------------------------------------------------------------------


def center_crop_window(
    height: int, width: int, crop_fraction: float = CENTER_CROP_FRACTION
) -> tuple[int, int, int, int]:
  """The central square covering `crop_fraction` of the shorter side.

  Args:
    height: image height in pixels.
    width: image width in pixels.
    crop_fraction: side of the square as a fraction of min(height, width),
      in (0, 1].

  Returns:
    (top, left, crop_height, crop_width) with crop_height == crop_width >= 1.
  """
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'crop_fraction must be in (0, 1], got {crop_fraction!r}.')
  side = max(1, int(round(crop_fraction * min(height, width))))
  return (height - side) // 2, (width - side) // 2, side, side


def random_crop_window(
    height: int,
    width: int,
    rng: np.random.Generator,
    area_range: tuple[float, float] = RANDOM_CROP_AREA_RANGE,
    aspect_ratio_range: tuple[float, float] = RANDOM_CROP_ASPECT_RATIO_RANGE,
    max_attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Samples an Inception-style random crop window.

  Draws a crop area uniformly from `area_range` (as a fraction of the image
  area) and an aspect ratio (width / height) log-uniformly from
  `aspect_ratio_range`, and keeps the first draw that fits in the image. If no
  draw fits in `max_attempts`, falls back to the largest central crop whose
  aspect ratio is within range.

  Args:
    height: image height in pixels.
    width: image width in pixels.
    rng: source of randomness.
    area_range: (min, max) crop area as a fraction of height * width.
    aspect_ratio_range: (min, max) crop width / height.
    max_attempts: number of draws before the central fallback.

  Returns:
    (top, left, crop_height, crop_width), a window inside the image.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f'Image must be non-empty, got height={height}, width={width}.')
  min_ratio, max_ratio = aspect_ratio_range
  area = height * width
  log_ratio_range = (math.log(min_ratio), math.log(max_ratio))
  for _ in range(max_attempts):
    target_area = area * rng.uniform(*area_range)
    aspect_ratio = math.exp(rng.uniform(*log_ratio_range))
    crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
    crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  # Fallback: the whole image, trimmed to the nearest allowed aspect ratio.
  image_ratio = width / height
  if image_ratio < min_ratio:
    crop_width, crop_height = width, max(1, int(round(width / min_ratio)))
  elif image_ratio > max_ratio:
    crop_width, crop_height = max(1, int(round(height * max_ratio))), height
  else:
    crop_width, crop_height = width, height
  return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def decode_and_crop(
    encoded_image: bytes,
    size: int,
    window_fn: Callable[[int, int], tuple[int, int, int, int]],
) -> np.ndarray:
  """Decodes an encoded image, crops a window and resizes it to a square.

  Args:
    encoded_image: JPEG / PNG / ... bytes of an image of any mode.
    size: output side length.
    window_fn: (height, width) -> (top, left, crop_height, crop_width), the
      window in the coordinates of the full-resolution image.

  Returns:
    uint8 [size, size, 3] RGB image.
  """
  with Image.open(io.BytesIO(encoded_image)) as image:
    width, height = image.size
    top, left, crop_height, crop_width = window_fn(height, width)
    # A JPEG can be decoded at 1/2, 1/4 or 1/8 scale for a fraction of the
    # cost; ask for the smallest scale at which the window still has at
    # least `size` pixels per side, so the final resize only ever shrinks.
    requested = (
        max(1, math.ceil(width * size / crop_width)),
        max(1, math.ceil(height * size / crop_height)),
    )
    draft = image.draft('RGB', requested)
    # draft returns the original image's extent in the reduced image's
    # pixels (None when the format does not support reduced decoding).
    scale = width / draft[1][2] if draft else 1.0
    box = (
        left / scale,
        top / scale,
        (left + crop_width) / scale,
        (top + crop_height) / scale,
    )
    rgb = image.convert('RGB')
    resized = rgb.resize((size, size), resample=Image.Resampling.BICUBIC, box=box)
    return np.asarray(resized, dtype=np.uint8)


def decode_and_random_crop(
    encoded_image: bytes, size: int, rng: np.random.Generator
) -> np.ndarray:
  """Train preprocessing: random-resized crop to uint8 [size, size, 3]."""
  return decode_and_crop(
      encoded_image, size, functools.partial(random_crop_window, rng=rng)
  )


def decode_and_center_crop(
    encoded_image: bytes, size: int, crop_fraction: float = CENTER_CROP_FRACTION
) -> np.ndarray:
  """Eval preprocessing: central crop, resized to uint8 [size, size, 3]."""
  return decode_and_crop(
      encoded_image,
      size,
      functools.partial(center_crop_window, crop_fraction=crop_fraction),
  )


# --------------------------------------------------------------------------
# Datasets.
# --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ImageDataset:
  """One split of an image classification dataset, with random access.

  Attributes:
    name: dataset name, e.g. 'cifar10'.
    split: split name, e.g. 'train'.
    num_examples: number of examples used (the first `num_examples` of the
      source).
    image_shape: (H, W, C) of the images this dataset yields.
    num_classes: number of label classes.
    source: random-access sequence of example dicts with 'image' and 'label'
      (a tfds data source). Images are decoded uint8 [H, W, C] arrays, or
      encoded bytes when `crop_size` is set.
    crop_size: when set, images are decoded per example and cropped to
      [crop_size, crop_size, 3] (ImageNet); `image_shape` is then
      (crop_size, crop_size, 3).
    images: uint8 [num_examples, H, W, C] once cached (see `cache`), else None.
    labels: int32 [num_examples] once cached, else None.
    num_threads: threads that decode and crop an eval batch when `crop_size`
      is set; `train_iterator` decodes with as many by default.
  """

  name: str
  split: str
  num_examples: int
  image_shape: tuple[int, int, int]
  num_classes: int
  source: Sequence[Mapping[str, Any]] | None = None
  crop_size: int | None = None
  images: np.ndarray | None = None
  labels: np.ndarray | None = None
  num_threads: int = dataclasses.field(
      default_factory=lambda: min(32, os.cpu_count() or 1)
  )

  def __post_init__(self):
    if self.source is None and self.images is None:
      raise ValueError('ImageDataset needs a source or cached images.')
    self._decode_pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool_lock = threading.Lock()

  @classmethod
  def from_arrays(
      cls,
      images: np.ndarray,
      labels: np.ndarray,
      num_classes: int,
      name: str = 'arrays',
      split: str = 'train',
  ) -> ImageDataset:
    """An in-memory dataset from uint8 images [N, H, W, C] and labels [N]."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(
          f'images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}.'
      )
    if labels.shape != images.shape[:1]:
      raise ValueError(
          f'labels must have shape [{images.shape[0]}], got {labels.shape}.'
      )
    return cls(
        name=name,
        split=split,
        num_examples=images.shape[0],
        image_shape=tuple(images.shape[1:]),
        num_classes=num_classes,
        images=images,
        labels=labels.astype(np.int32),
    )

  @property
  def is_cached(self) -> bool:
    return self.images is not None

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Example `index` as {'image': uint8 [H, W, C], 'label': int}."""
    index = int(index)
    if not -self.num_examples <= index < self.num_examples:
      raise IndexError(
          f'Index {index} out of range for {self.num_examples} examples.'
      )
    batch = self.get_batch(np.array([index % self.num_examples]))
    return {'image': batch['image'][0], 'label': int(batch['label'][0])}

  def cache(self) -> ImageDataset:
    """Decodes every example into `images` / `labels` (once); returns self."""
    if self.is_cached:
      return self
    if self.crop_size is not None:
      raise ValueError(
          f'{self.name} is decoded per example with a random crop and cannot '
          f'be cached; only {IN_MEMORY_DATASETS} can.'
      )
    start_time = time.perf_counter()
    images = np.empty((self.num_examples, *self.image_shape), np.uint8)
    labels = np.empty((self.num_examples,), np.int32)
    # Decoding is bound by Python-level record parsing under the GIL, so
    # threads do not help; batched reads (`__getitems__`) do.
    for start in range(0, self.num_examples, _CACHE_CHUNK_SIZE):
      stop = min(start + _CACHE_CHUNK_SIZE, self.num_examples)
      chunk = self._read_records(np.arange(start, stop))
      images[start:stop] = np.stack([example['image'] for example in chunk])
      labels[start:stop] = [example['label'] for example in chunk]
    self.images, self.labels = images, labels
    logging.info(
        'Cached %s/%s: %d examples %s in %.1f s.',
        self.name,
        self.split,
        self.num_examples,
        images.shape[1:],
        time.perf_counter() - start_time,
    )
    return self

  def get_batch(self, indices: np.ndarray) -> Batch:
    """Gathers examples `indices`, un-augmented (evaluation, analysis).

    Datasets with `crop_size` take the central crop (`decode_and_center_crop`);
    training's random crops come from `train_iterator`.

    Args:
      indices: int [b] example indices in [0, num_examples).

    Returns:
      {'image': uint8 [b, H, W, C], 'label': int32 [b]}.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(
          f'Indices must be in [0, {self.num_examples}), got '
          f'[{indices.min()}, {indices.max()}].'
      )
    if self.is_cached:
      return {'image': self.images[indices], 'label': self.labels[indices]}
    images = np.empty((indices.size, *self.image_shape), np.uint8)
    labels = np.empty((indices.size,), np.int32)
    if not indices.size:
      return {'image': images, 'label': labels}
    records = self._read_records(indices)
    labels[:] = [record['label'] for record in records]
    if self.crop_size is None:
      images[:] = np.stack([record['image'] for record in records])
    else:
      # PIL releases the GIL while decoding and resizing, so threads scale.
      crops = self._pool().map(
          functools.partial(decode_and_center_crop, size=self.crop_size),
          [record['image'] for record in records],
      )
      for i, crop in enumerate(crops):
        images[i] = crop
    return {'image': images, 'label': labels}

  def _read_records(self, indices: np.ndarray) -> Sequence[Mapping[str, Any]]:
    keys = [int(i) for i in indices]
    getitems = getattr(self.source, '__getitems__', None)
    if getitems is not None:
      return getitems(keys)
    return [self.source[key] for key in keys]

  def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._pool_lock:
      if self._decode_pool is None:
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.num_threads, thread_name_prefix=f'decode_{self.name}'
        )
      return self._decode_pool


def _not_prepared_message(name: str, builder: Any, data_dir: str) -> str:
  message = (
      f"Dataset '{name}' is not prepared under data_dir={data_dir!r} "
      f'(looked in {builder.data_dir}). Prepare it once, in array_record '
      f'format, with (needs TensorFlow and internet once):\n'
      f'  tfds build {name} --file_format=array_record --data_dir={data_dir}\n'
      f'or point --data_dir / $TFDS_DATA_DIR at a directory that holds it.'
  )
  if name == 'imagenet2012':
    message += (
        '\nImageNet cannot be downloaded automatically: first place '
        'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
        f'{os.path.join(data_dir, "downloads", "manual")}.'
    )
  return message


def load_dataset(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    num_examples: int | None = None,
    cache: bool | None = None,
) -> ImageDataset:
  """Opens one split of a tfds image classification dataset.

  Args:
    name: one of DATASETS.
    split: a split of that dataset, e.g. 'train', 'test' ('validation' for
      imagenet2012).
    data_dir: tfds data dir; defaults to $TFDS_DATA_DIR, else tfds's default.
    num_examples: use only the first `num_examples` examples of the split
      (small experiments); None uses all of them.
    cache: decode every example into memory now. Defaults to True for
      IN_MEMORY_DATASETS; must be False for imagenet2012.

  Returns:
    The dataset, with `image_shape` (H, W, C) of the images it yields:
    (32, 32, 3) for CIFAR, (28, 28, 1) for MNIST, (224, 224, 3) for ImageNet.

  Raises:
    ValueError: unknown name or split, or a bad num_examples / cache.
    DatasetNotFoundError: the dataset is not prepared in array_record format
      under the data dir.
  """
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; valid names: {DATASETS}.')
  crop_size = CROPPED_DATASETS.get(name)
  if cache is None:
    cache = crop_size is None
  elif cache and crop_size is not None:
    raise ValueError(
        f'{name} is too large to cache in memory; use cache=False '
        f'(caching is for {IN_MEMORY_DATASETS}).'
    )
  data_dir = resolve_data_dir(data_dir)
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise DatasetNotFoundError(_not_prepared_message(name, builder, data_dir))
  file_format = builder.info.file_format
  if file_format is not None and file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DatasetNotFoundError(
        f"Dataset '{name}' under {builder.data_dir} is prepared as "
        f'{file_format}, which has no random access. Rebuild it with\n'
        f'  tfds build {name} --file_format=array_record --data_dir=<new dir>'
    )
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(
        f'Unknown split {split!r} for {name}; valid splits: {sorted(splits)}.'
    )
  split_size = splits[split].num_examples
  if num_examples is None:
    num_examples = split_size
  elif not 0 < core.require_int('num_examples', num_examples, 1) <= split_size:
    raise ValueError(
        f'num_examples must be in [1, {split_size}] for {name}/{split}, got '
        f'{num_examples}.'
    )

  features = builder.info.features
  decoders = None
  if crop_size is not None:
    # Keep the encoded bytes: decoding at full resolution and cropping later
    # would waste most of the work.
    decoders = {'image': tfds.decode.SkipDecoding()}
    image_shape = (crop_size, crop_size, 3)
  else:
    image_shape = tuple(features['image'].shape)
  source = builder.as_data_source(split=split, decoders=decoders)
  dataset = ImageDataset(
      name=name,
      split=split,
      num_examples=num_examples,
      image_shape=image_shape,
      num_classes=features['label'].num_classes,
      source=source,
      crop_size=crop_size,
  )
  return dataset.cache() if cache else dataset
