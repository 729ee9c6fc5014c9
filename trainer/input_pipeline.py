"""Host-side image input pipeline: tfds array_record sources -> per-process uint8 batches.

The pipeline only reads, decodes and batches; all augmentation except
ImageNet's random-resized crop to a fixed size happens later on device inside
the jitted train step. Batches are dicts of numpy arrays:

  train: {'image': uint8 [b, H, W, C], 'label': int32 [b]}
  eval:  {'image': uint8 [b, H, W, C], 'label': int32 [b], 'mask': bool [b]}

where `b = global_batch_size // process_count` is this process's share of the
global batch. `to_global_array` assembles the per-process pieces into one
global `jax.Array` per field.

Training input (`train_iterator`) is a grain pipeline of whole batches:
per-process shares of each global batch, decoding in threads or worker
processes, prefetching and a resumable state. Its order is a pure function of
(seed, global step):

  epoch, step_in_epoch = divmod(step, steps_per_epoch)
  global batch = epoch_permutation(N, seed, epoch)[step_in_epoch * B : (step_in_epoch + 1) * B]

with N training examples and global batch size B, so a run resumed from a
checkpoint at step k sees exactly the batches an uninterrupted run would have
seen from step k on, whatever its number of processes or workers. (This is
the order of the pipeline before grain, so its checkpoints resume onto the
same batches.)

The per-epoch permutation is numpy's, not grain's per-example
`MapDataset.shuffle`, and grain's elements are whole batches: that shuffle
costs ~5-7 us per example, and each further grain stage 2-14 us of Python
per element, so a pipeline that goes through grain example by example
caps at ~60k CIFAR-10 images/s (benchmarks/grain_input.py), no more than
an accelerator training a small CIFAR network reads (50-150k images/s). One
numpy permutation per epoch (~1 ms for 50,000 examples) and one gather per
batch give 1-2M images/s.

Datasets are read with `tfds.data_source` (array_record, random access, no
TensorFlow needed). CIFAR and MNIST are decoded once into memory; ImageNet is
decoded per example with a random-resized crop (train) or a center crop
(eval) to 224x224.
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
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import flags
from absl import logging
import grain
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

Batch = dict[str, np.ndarray]

# Datasets small enough to hold decoded in host memory (CIFAR-10 train is
# 50000 * 32 * 32 * 3 bytes = 150 MB).
IN_MEMORY_DATASETS = ('cifar10', 'cifar100', 'mnist')
# Datasets decoded per example, with a crop to a fixed square size.
CROPPED_DATASETS = {'imagenet2012': 224}
# Every dataset `load_dataset` knows.
DATASETS = IN_MEMORY_DATASETS + tuple(CROPPED_DATASETS)

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


def _check_positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  return int(value)


def _check_non_negative_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f'{name} must be a non-negative integer, got {value!r}.')
  return int(value)


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
  elif not 0 < _check_positive_int('num_examples', num_examples) <= split_size:
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


# --------------------------------------------------------------------------
# Batch counts and evaluation.
# --------------------------------------------------------------------------


def _process_share(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
  """(process_index, process_count, local batch size), defaults from jax."""
  global_batch_size = _check_positive_int('global_batch_size', global_batch_size)
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  process_count = _check_positive_int('process_count', process_count)
  if (
      isinstance(process_index, bool)
      or not isinstance(process_index, (int, np.integer))
      or not 0 <= process_index < process_count
  ):
    raise ValueError(
        f'process_index must be an int in [0, {process_count}), got {process_index!r}.'
    )
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be divisible by '
        f'process_count={process_count}.'
    )
  return int(process_index), process_count, global_batch_size // process_count


def _process_slice(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
  """(offset, size) of this process's contiguous slice of a global batch."""
  process_index, _, local_batch_size = _process_share(
      global_batch_size, process_index, process_count
  )
  return process_index * local_batch_size, local_batch_size


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per training epoch (the remainder is dropped)."""
  global_batch_size = _check_positive_int('global_batch_size', global_batch_size)
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(
        f'global_batch_size={global_batch_size} exceeds the {num_examples} '
        'training examples; not even one full batch per epoch.'
    )
  return steps


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """int64 [num_examples]: the training order of `epoch`, a function of (seed, epoch)."""
  seed = _check_non_negative_int('seed', seed)
  epoch = _check_non_negative_int('epoch', epoch)
  rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
  return rng.permutation(num_examples)


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Global eval batches covering all examples (the last one padded)."""
  global_batch_size = _check_positive_int('global_batch_size', global_batch_size)
  return -(-num_examples // global_batch_size)


def eval_batches(
    dataset: ImageDataset,
    global_batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
  """One pass over every example in order, this process's slice of each batch.

  The last global batch is padded with zero images; `mask` is False there, so
  the metrics cover exactly the `dataset.num_examples` real examples.

  Args:
    dataset: the eval split.
    global_batch_size: examples per step across all processes; divisible by
      process_count.
    process_index: this process; defaults to jax.process_index().
    process_count: number of processes; defaults to jax.process_count().

  Returns:
    An iterator of `num_eval_steps` batches {'image': uint8 [b, H, W, C],
    'label': int32 [b], 'mask': bool [b]}, b = global_batch_size //
    process_count.
  """
  offset, local_batch_size = _process_slice(
      global_batch_size, process_index, process_count
  )
  num_steps = num_eval_steps(dataset.num_examples, global_batch_size)

  def generate() -> Iterator[Batch]:
    for step in range(num_steps):
      positions = step * global_batch_size + offset + np.arange(local_batch_size)
      mask = positions < dataset.num_examples
      real = dataset.get_batch(positions[mask])
      batch = {
          'image': np.zeros((local_batch_size, *dataset.image_shape), np.uint8),
          'label': np.zeros((local_batch_size,), np.int32),
          'mask': mask,
      }
      # Real examples come first: the positions are increasing.
      num_real = int(mask.sum())
      batch['image'][:num_real] = real['image']
      batch['label'][:num_real] = real['label']
      yield batch

  return generate()


# --------------------------------------------------------------------------
# Training input (grain).
# --------------------------------------------------------------------------

# The fields of `TrainIterator.get_state` besides 'step': what the step means.
_STATE_FIELDS = ('seed', 'global_batch_size', 'num_examples')
# Batches each grain worker process prepares ahead of the training loop.
_WORKER_BUFFER_SIZE = 2
# Epoch permutations each process keeps: grain's read threads may work on
# both sides of an epoch boundary at once.
_CACHED_PERMUTATIONS = 2
# grain read threads of a decoding (uncached) pipeline: batches read at once.
# Each batch is decoded by the process's decode pool, so two keep the pool
# busy while the other batch reads its records or is assembled.
_DECODE_READ_THREADS = 2


class _BatchOrder:
  """Global step -> this process's example indices: `epoch_permutation` cut into batches.

  Global batch k is positions [s * B, (s + 1) * B) of epoch e's permutation,
  (e, s) = divmod(k, steps_per_epoch); this process takes its positions
  [offset, offset + size) of it. The newest permutations are cached; a
  pickled copy (in a grain worker) starts with an empty cache and computes
  its own (~1 ms for 50,000 examples).
  """

  def __init__(
      self, num_examples: int, global_batch_size: int, seed: int, offset: int, size: int
  ):
    self.num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.offset = offset
    self.size = size
    self.steps_per_epoch = steps_per_epoch(num_examples, global_batch_size)
    self._permutations: dict[int, np.ndarray] = {}

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_permutations': {}}

  def _permutation(self, epoch: int) -> np.ndarray:
    permutation = self._permutations.get(epoch)
    if permutation is None:
      permutation = epoch_permutation(self.num_examples, self.seed, epoch)
      # Keeps the newest computed (dicts keep insertion order). Replaced,
      # never mutated: read threads may look at the cache while another
      # thread adds to it.
      cache = [*self._permutations.items(), (epoch, permutation)]
      self._permutations = dict(cache[-_CACHED_PERMUTATIONS:])
    return permutation

  def __call__(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, int64 [size] example indices) of this process's part of global batch `step`."""
    epoch, step_in_epoch = divmod(int(step), self.steps_per_epoch)
    start = step_in_epoch * self.global_batch_size + self.offset
    return epoch, self._permutation(epoch)[start : start + self.size]


class _GatherBatch:
  """Global step -> this process's batch of a cached dataset, one numpy gather per field."""

  def __init__(self, order: _BatchOrder, images: np.ndarray, labels: np.ndarray):
    self._order = order
    self._images = images
    self._labels = labels

  def __call__(self, step: int, unused_element: Any = None) -> Batch:
    """{'image': uint8 [b, H, W, C], 'label': int32 [b]} of global step `step`."""
    _, indices = self._order(step)
    # np.take: ~8% faster than fancy indexing for 128 random CIFAR rows.
    return {
        'image': np.take(self._images, indices, axis=0),
        'label': np.take(self._labels, indices),
    }


class _DecodeBatch:
  """Global step -> this process's batch read from a tfds source, decoded in threads.

  Reads only this process's b records of the global batch. With `crop_size`,
  example i of epoch e gets a random-resized crop drawn from
  SeedSequence([seed, e, i]): the same crop whatever the number of
  processes, workers or threads. The decode pool is made on first use in
  each process (it does not pickle into grain workers).
  """

  def __init__(
      self,
      order: _BatchOrder,
      source: Sequence[Mapping[str, Any]],
      image_shape: tuple[int, int, int],
      crop_size: int | None,
      num_threads: int,
  ):
    self._order = order
    self._source = source
    self._image_shape = image_shape
    self._crop_size = crop_size
    self._num_threads = num_threads
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool_lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state['_pool'], state['_pool_lock']
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._pool = None
    self._pool_lock = threading.Lock()

  def _decode_pool(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._pool_lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._num_threads, thread_name_prefix='decode_train'
        )
      return self._pool

  def _random_crop(self, encoded_image: bytes, index: int, epoch: int) -> np.ndarray:
    seed_sequence = np.random.SeedSequence([self._order.seed, epoch, index])
    rng = np.random.default_rng(seed_sequence)
    return decode_and_random_crop(encoded_image, self._crop_size, rng)

  def __call__(self, step: int, unused_element: Any = None) -> Batch:
    """{'image': uint8 [b, H, W, C], 'label': int32 [b]} of global step `step`."""
    epoch, indices = self._order(step)
    keys = indices.tolist()
    getitems = getattr(self._source, '__getitems__', None)
    records = getitems(keys) if getitems is not None else [self._source[k] for k in keys]
    images = np.empty((len(keys), *self._image_shape), np.uint8)
    labels = np.array([record['label'] for record in records], np.int32)
    if self._crop_size is None:
      images[:] = np.stack([record['image'] for record in records])
    else:
      # PIL releases the GIL while decoding and resizing, so threads scale.
      crops = self._decode_pool().map(
          functools.partial(self._random_crop, epoch=epoch),
          [record['image'] for record in records],
          keys,
      )
      for i, crop in enumerate(crops):
        images[i] = crop
    return {'image': images, 'label': labels}


class TrainIterator(grain.DatasetIterator):
  """Endless training batches of one process; a grain `DatasetIterator`.

  `next()` returns this process's slice of the next global batch,
  {'image': uint8 [b, H, W, C], 'label': int32 [b]}. The batches come from a
  grain pipeline (`to_iter_dataset`, plus `mp_prefetch` with worker
  processes) that is opened at the first `next()` or `start_prefetch()`.
  Without read threads or workers, `next()` reads the MapDataset's element
  itself: grain's iterator would make the same call in the same thread, plus
  ~17 us of bookkeeping per batch (20-35% of a CIFAR-10 batch's gather).

  The state is the number of batches taken, with the seed, global batch size
  and number of examples that give it its meaning:

    {'step': 12, 'seed': 0, 'global_batch_size': 256, 'num_examples': 50000}

  Every process of a run has the same state, whatever its process index,
  process count or number of workers, so a run can resume with other values
  of those. `set_state` reopens the pipeline at that step: grain's MapDataset
  reads any position directly, without replaying the batches before it.
  Use `close()` (or a `with` block) to stop the worker processes.
  """

  def __init__(
      self,
      batches: grain.MapDataset,
      *,
      read_options: grain.ReadOptions,
      num_workers: int,
      description: Mapping[str, int],
  ):
    """Use `train_iterator`.

    Args:
      batches: global step -> this process's batch, an endless MapDataset.
      read_options: threads and buffer of each process reading `batches`.
      num_workers: grain worker processes; 0 reads in this process.
      description: the _STATE_FIELDS values of this iterator.
    """
    super().__init__()
    self._batches = batches
    self._read_options = read_options
    self._num_workers = num_workers
    self._description = dict(description)
    self._step = 0
    self._iterator: grain.DatasetIterator | None = None
    self._reads_directly = not num_workers and not read_options.num_threads

  @property
  def step(self) -> int:
    """Batches taken so far: the global step of the next batch."""
    return self._step

  def _open(self) -> grain.DatasetIterator:
    if self._closed:
      raise ValueError('This TrainIterator is closed.')
    if self._iterator is None:
      dataset = self._batches[self._step :]
      iter_dataset = dataset.to_iter_dataset(self._read_options)
      if self._num_workers:
        if not flags.FLAGS.is_parsed():
          # grain 0.2.18's mp_prefetch reads one of its absl flags, which
          # raises before flags are parsed (programs without absl.app, pytest;
          # google/grain#1355): take the defaults, as absl.app would.
          flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=self._num_workers,
                per_worker_buffer_size=_WORKER_BUFFER_SIZE,
            )
        )
      self._iterator = iter(iter_dataset)
    return self._iterator

  def __next__(self) -> Batch:
    if self._reads_directly:
      if self._closed:
        raise ValueError('This TrainIterator is closed.')
      batch = self._batches[self._step]
    else:
      batch = next(self._open())
    if self._num_workers:
      # Workers hand over every array in shared memory, which its
      # SharedMemoryArray frees when collected; own copies (a few ms for an
      # ImageNet batch) keep that out of the training loop and let batches
      # outlive the iterator.
      batch = {key: np.array(value) for key, value in batch.items()}
    self._step += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {'step': self._step, **self._description}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues after `state['step']` batches (state from `get_state`).

    Raises:
      ValueError: the state is not a TrainIterator state, or it was taken with
        another seed, global batch size or number of examples (its steps would
        mean other batches).
    """
    missing = [key for key in ('step', *_STATE_FIELDS) if key not in state]
    if missing:
      raise ValueError(
          f'Not a TrainIterator state (missing {missing}): {dict(state)!r}.'
      )
    saved = {key: state[key] for key in _STATE_FIELDS}
    if saved != self._description:
      raise ValueError(
          f'The input state was saved with {saved}, but this iterator has '
          f'{self._description}; resume with the same seed, batch size and '
          'training examples.'
      )
    step = _check_non_negative_int("state['step']", state['step'])
    self._close_pipeline()
    self._step = step

  def start_prefetch(self) -> None:
    """Opens the pipeline now (starting its workers) rather than at `next()`."""
    if self._reads_directly:
      if self._closed:
        raise ValueError('This TrainIterator is closed.')
      return
    self._open().start_prefetch()

  def _close_pipeline(self) -> None:
    iterator, self._iterator = getattr(self, '_iterator', None), None
    if iterator is not None:
      iterator.close()

  def close(self) -> None:
    """Stops the worker processes; `next()` then raises ValueError."""
    self._close_pipeline()
    super().close()

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __str__(self) -> str:
    return (
        f'TrainIterator(step={self._step}, num_workers={self._num_workers}, '
        f'{", ".join(f"{k}={v}" for k, v in self._description.items())})'
    )


def train_iterator(
    dataset: ImageDataset,
    global_batch_size: int,
    *,
    seed: int,
    num_examples: int | None = None,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int | None = None,
) -> TrainIterator:
  """Endless training batches, this process's slice of each global batch.

  A grain pipeline whose element k is this process's part of global batch k:
  positions [p * b, (p + 1) * b) of it, as example indices from
  `epoch_permutation` (see the module docstring), gathered from the decoded
  arrays of a cached dataset, else read from its tfds data source and
  decoded. Each epoch visits a fresh permutation of the examples and drops
  the last partial global batch. Process p reads and decodes only its b
  examples, and the processes' batches concatenated in process order are
  the one-process batch. ImageNet's random-resized crop of example i in
  epoch e is drawn from SeedSequence([seed, e, i]), so it does not depend on
  the number of processes, workers or threads.

  Args:
    dataset: the training split.
    global_batch_size: examples per step across all processes; divisible by
      process_count.
    seed: non-negative int; fixes the order (and ImageNet's random crops).
    num_examples: train on only the first `num_examples` examples of
      `dataset` (small experiments); None uses all of them.
    num_workers: grain worker processes that prepare batches (decoding and
      cropping); 0 prepares them in this process. The batches are the same
      either way. Workers take seconds to start (each imports this module
      and unpickles the pipeline: the tfds source, or a cached dataset's
      arrays), so they pay off for decoded datasets (ImageNet), not for
      cached ones.
    process_index: this process; defaults to jax.process_index().
    process_count: number of processes; defaults to jax.process_count().
    num_threads: threads in each process (this one, or each worker). For
      cached datasets, grain read threads gathering batches ahead of the
      training loop; default 0: `next()` gathers the batch itself (50-90 us
      for 128 CIFAR-10 images), which yields more images/s than a grain read
      thread (grain's thread handoff costs ~40 us per element, against
      ~12 us for the bare queue of the pipeline before grain). Read threads
      do overlap the gather with the training step, which may matter for
      per-process batches of thousands of examples. For decoded datasets,
      threads decoding the images of a batch, at least 1; default
      dataset.num_threads split over the workers (PIL releases the GIL while
      decoding), and two grain read threads read batches ahead.

  Returns:
    A TrainIterator of {'image': uint8 [b, H, W, C], 'label': int32 [b]} with
    b = global_batch_size // process_count, supporting get_state / set_state.
  """
  process_index, process_count, local_batch_size = _process_share(
      global_batch_size, process_index, process_count
  )
  seed = _check_non_negative_int('seed', seed)
  num_workers = _check_non_negative_int('num_workers', num_workers)
  if num_examples is None:
    num_examples = dataset.num_examples
  elif not 0 < _check_positive_int('num_examples', num_examples) <= dataset.num_examples:
    raise ValueError(
        f'num_examples must be in [1, {dataset.num_examples}], got {num_examples}.'
    )
  if num_threads is None and dataset.is_cached:
    num_threads = 0
  elif num_threads is None:
    num_threads = max(1, dataset.num_threads // max(1, num_workers))
  elif dataset.is_cached:
    num_threads = _check_non_negative_int('num_threads', num_threads)
  else:
    num_threads = _check_positive_int('num_threads', num_threads)

  order = _BatchOrder(
      num_examples,
      global_batch_size,
      seed,
      offset=process_index * local_batch_size,
      size=local_batch_size,
  )
  if dataset.is_cached:
    make_batch = _GatherBatch(order, dataset.images, dataset.labels)
    read_threads = num_threads
  else:
    make_batch = _DecodeBatch(
        order, dataset.source, dataset.image_shape, dataset.crop_size, num_threads
    )
    read_threads = _DECODE_READ_THREADS
  # Element k of `batches` is the batch of global step k: the steps of one
  # epoch, repeated endlessly, with the global step as the element's index.
  steps = grain.MapDataset.range(order.steps_per_epoch).repeat()
  batches = steps.map_with_index(make_batch)
  read_options = grain.ReadOptions(
      num_threads=read_threads,
      prefetch_buffer_size=max(2, read_threads) if read_threads else 0,
  )
  return TrainIterator(
      batches,
      read_options=read_options,
      num_workers=num_workers,
      # Python ints: the state is saved as JSON.
      description=dict(
          seed=seed,
          global_batch_size=int(global_batch_size),
          num_examples=int(num_examples),
      ),
  )


# --------------------------------------------------------------------------
# Device placement.
# --------------------------------------------------------------------------


def to_global_array(
    batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
  """Assembles every process's local batch into global arrays.

  Args:
    batch: this process's slice of the global batch, arrays with leading
      dimension b = global_batch_size // process_count.
    sharding: where the global arrays live, typically
      NamedSharding(mesh, PartitionSpec('data')), which splits the batch
      dimension over the mesh's 'data' axis.

  Returns:
    The same keys, each a jax.Array with leading dimension global_batch_size.
  """
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in batch.items()
  }
