"""Image batches: the resumable training iterator, evaluation batches, device placement.

Batches are dicts of numpy arrays:

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
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
import grain
import jax
import numpy as np

from trainer import core
from trainer.image_data import Batch, ImageDataset, decode_and_random_crop

# --------------------------------------------------------------------------
# Batch counts and evaluation.
# --------------------------------------------------------------------------


def _process_share(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
  """(process_index, process_count, local batch size), defaults from jax."""
  global_batch_size = core.require_int('global_batch_size', global_batch_size, 1)
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  process_count = core.require_int('process_count', process_count, 1)
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
  global_batch_size = core.require_int('global_batch_size', global_batch_size, 1)
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(
        f'global_batch_size={global_batch_size} exceeds the {num_examples} '
        'training examples; not even one full batch per epoch.'
    )
  return steps


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """int64 [num_examples]: the training order of `epoch`, a function of (seed, epoch)."""
  seed = core.require_int('seed', seed, 0)
  epoch = core.require_int('epoch', epoch, 0)
  rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
  return rng.permutation(num_examples)


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Global eval batches covering all examples (the last one padded)."""
  global_batch_size = core.require_int('global_batch_size', global_batch_size, 1)
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
    step = core.require_int("state['step']", state['step'], 0)
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
  seed = core.require_int('seed', seed, 0)
  num_workers = core.require_int('num_workers', num_workers, 0)
  if num_examples is None:
    num_examples = dataset.num_examples
  elif not 0 < core.require_int('num_examples', num_examples, 1) <= dataset.num_examples:
    raise ValueError(
        f'num_examples must be in [1, {dataset.num_examples}], got {num_examples}.'
    )
  if num_threads is None and dataset.is_cached:
    num_threads = 0
  elif num_threads is None:
    num_threads = max(1, dataset.num_threads // max(1, num_workers))
  elif dataset.is_cached:
    num_threads = core.require_int('num_threads', num_threads, 0)
  else:
    num_threads = core.require_int('num_threads', num_threads, 1)

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
