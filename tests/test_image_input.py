"""Tests for trainer.image_data and trainer.image_batches (loading, order, sharding, grain iterator state and workers)
and trainer.checkpointing (the input state in checkpoints, checkpoints with and without it)."""

import io
import itertools
import json
import os

import grain
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from conftest import DATA_DIR, needs_data
from trainer import checkpointing, image_batches, image_data

needs_real_data = needs_data('cifar10', 'mnist')

REAL_DATASETS = {
    # name: (image_shape, num_train, num_test)
    'cifar10': ((32, 32, 3), 50_000, 10_000),
    'mnist': ((28, 28, 1), 60_000, 10_000),
}


def _index_dataset(num_examples, image_shape=(4, 4, 1)):
  """In-memory dataset whose labels are the example indices, for order tests."""
  indices = np.arange(num_examples)
  images = np.broadcast_to(
      (indices % 256).astype(np.uint8)[:, None, None, None],
      (num_examples, *image_shape),
  )
  return image_data.ImageDataset.from_arrays(
      images, indices, num_classes=num_examples
  )


def _labels(batches):
  return [batch['label'] for batch in batches]


# ----------------------------------------------------------------------------
# Real data.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def cached_test_splits():
  """The cached test split of each real dataset (10,000 examples each)."""
  return {
      name: image_data.load_dataset(name, 'test', data_dir=DATA_DIR)
      for name in REAL_DATASETS
  }


@needs_real_data
@pytest.mark.parametrize('name', sorted(REAL_DATASETS))
def test_real_train_split_matches_tfds(name):
  image_shape, num_train, _ = REAL_DATASETS[name]
  # Uncached: decoding 50k-60k examples is the slow part, not needed here.
  train = image_data.load_dataset(name, 'train', DATA_DIR, cache=False)
  assert train.num_examples == len(train) == num_train
  assert train.image_shape == image_shape
  assert train.num_classes == 10
  assert not train.is_cached

  source = tfds.data_source(name, split='train', data_dir=str(DATA_DIR))
  for index in (0, num_train - 1):
    example = train[index]
    np.testing.assert_array_equal(example['image'], source[index]['image'])
    assert example['label'] == source[index]['label']

  # A cached subset holds the first examples of the split.
  subset = image_data.load_dataset(name, 'train', DATA_DIR, num_examples=50)
  assert subset.images.shape == (50, *image_shape)
  np.testing.assert_array_equal(subset.images[0], source[0]['image'])
  assert subset.labels[0] == source[0]['label']


@needs_real_data
@pytest.mark.parametrize('name', sorted(REAL_DATASETS))
def test_real_test_split_is_cached(name, cached_test_splits):
  image_shape, _, num_test = REAL_DATASETS[name]
  test = cached_test_splits[name]
  assert test.is_cached
  assert test.num_examples == num_test
  assert test.images.shape == (num_test, *image_shape)
  assert test.images.dtype == np.uint8
  assert test.labels.shape == (num_test,)
  assert test.labels.dtype == np.int32
  assert test.labels.min() == 0 and test.labels.max() == 9
  source = tfds.data_source(name, split='test', data_dir=str(DATA_DIR))
  for index in (0, 1234, num_test - 1):
    np.testing.assert_array_equal(test.images[index], source[index]['image'])
    assert test.labels[index] == source[index]['label']


@needs_real_data
def test_eval_covers_all_cifar10_test_images(cached_test_splits):
  test = cached_test_splits['cifar10']
  batches = list(image_batches.eval_batches(test, 384, process_count=1, process_index=0))
  assert len(batches) == image_batches.num_eval_steps(10_000, 384) == 27
  mask = np.concatenate([batch['mask'] for batch in batches])
  assert mask.sum() == 10_000
  labels = np.concatenate([batch['label'] for batch in batches])[mask]
  np.testing.assert_array_equal(labels, test.labels)
  assert all(batch['image'].shape == (384, 32, 32, 3) for batch in batches)


@needs_real_data
def test_real_train_batches():
  train = image_data.load_dataset('cifar10', 'train', DATA_DIR, num_examples=96)
  batches = list(itertools.islice(_train(train, 32, seed=0), 4))
  batch = batches[0]
  assert batch['image'].shape == (32, 32, 32, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  # Every batch holds images of the dataset.
  rows = {image.tobytes() for image in train.images}
  assert all(image.tobytes() in rows for image in batch['image'])
  # The tfds source, read example by example in a worker process (which gets
  # a pickled copy of it), gives the batches that the cached arrays give.
  uncached = image_data.load_dataset('cifar10', 'train', DATA_DIR, cache=False)
  with image_batches.train_iterator(
      uncached, 32, seed=0, num_examples=96, num_workers=1, process_count=1, process_index=0
  ) as from_source:
    _assert_same_batches(list(itertools.islice(from_source, 4)), batches)


@needs_real_data
def test_data_dir_from_environment(monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(DATA_DIR))
  dataset = image_data.load_dataset('mnist', 'test', num_examples=10)
  assert dataset.images.shape == (10, 28, 28, 1)


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(image_data.DatasetNotFoundError) as error:
    image_data.load_dataset('cifar10', 'train', data_dir=tmp_path)
  message = str(error.value)
  assert 'tfds build cifar10 --file_format=array_record' in message
  assert str(tmp_path) in message
  assert isinstance(error.value, FileNotFoundError)


def test_unknown_name_lists_valid_names():
  assert set(image_data.DATASETS) == {'cifar10', 'cifar100', 'mnist', 'imagenet2012'}
  with pytest.raises(ValueError, match='cifar10.*cifar100.*mnist.*imagenet2012'):
    image_data.load_dataset('svhn', 'train')


@needs_real_data
def test_unknown_split_and_bad_subset():
  with pytest.raises(ValueError, match="Unknown split 'validation'.*test.*train"):
    image_data.load_dataset('mnist', 'validation', DATA_DIR)
  with pytest.raises(ValueError, match='num_examples'):
    image_data.load_dataset('mnist', 'test', DATA_DIR, num_examples=10_001)
  with pytest.raises(ValueError, match='cannot|too large'):
    image_data.load_dataset('imagenet2012', 'train', DATA_DIR, cache=True)


def test_bad_batch_and_process_arguments():
  dataset = _index_dataset(30)

  def train(global_batch_size=10, **kwargs):
    kwargs = {'seed': 0, 'process_count': 1, 'process_index': 0, **kwargs}
    return image_batches.train_iterator(dataset, global_batch_size, **kwargs)

  with pytest.raises(ValueError, match='divisible'):
    train(process_count=3)
  with pytest.raises(ValueError, match='process_index'):
    image_batches.eval_batches(dataset, 10, process_count=2, process_index=2)
  with pytest.raises(ValueError, match='process_index'):
    train(process_count=2, process_index=2)
  with pytest.raises(ValueError, match='exceeds'):
    train(32)
  with pytest.raises(ValueError, match='seed'):
    train(seed=-1)
  with pytest.raises(ValueError, match='num_examples'):
    train(num_examples=31)
  with pytest.raises(ValueError, match='num_workers'):
    train(num_workers=-1)
  with pytest.raises(ValueError, match='num_threads'):
    train(num_threads=-1)
  # Decoded datasets need at least one decoding thread; cached ones may
  # gather in the caller's thread.
  _, jpegs = _jpeg_dataset()
  with pytest.raises(ValueError, match='num_threads must be a positive integer, got 0'):
    image_batches.train_iterator(
        jpegs, 4, seed=0, process_count=1, process_index=0, num_threads=0
    )
  train(num_threads=0).close()
  with pytest.raises(ValueError, match='seed'):
    image_batches.epoch_permutation(10, -1, 0)
  with pytest.raises(ValueError, match='epoch'):
    image_batches.epoch_permutation(10, 0, 1.5)


# ----------------------------------------------------------------------------
# Order.
# ----------------------------------------------------------------------------


def _train(dataset, global_batch_size, seed, process_index=0, process_count=1, **kwargs):
  return image_batches.train_iterator(
      dataset,
      global_batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      **kwargs,
  )


def _assert_same_batches(actual, expected):
  assert len(actual) == len(expected)
  for a, b in zip(actual, expected):
    assert set(a) == set(b) == {'image', 'label'}
    for key in b:
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key])


def test_each_epoch_is_a_permutation():
  dataset = _index_dataset(103)  # 10 full batches of 10; 3 dropped per epoch
  epochs = list(itertools.islice(_train(dataset, 10, seed=7), 30))
  assert all(batch['label'].shape == (10,) for batch in epochs)
  assert all(batch['label'].dtype == np.int32 for batch in epochs)
  per_epoch = [np.concatenate(_labels(epochs[i : i + 10])) for i in (0, 10, 20)]
  for labels in per_epoch:
    assert len(np.unique(labels)) == 100
    assert labels.min() >= 0 and labels.max() < 103
  # Each image is the one of its label.
  batch = epochs[0]
  np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['label'] % 256)
  # Epochs are shuffled differently, and drop different examples.
  assert not np.array_equal(per_epoch[0], per_epoch[1])
  assert not np.array_equal(per_epoch[1], per_epoch[2])
  assert len({tuple(np.setdiff1d(np.arange(103), labels)) for labels in per_epoch}) > 1


def test_order_is_fixed_by_seed():
  dataset = _index_dataset(100)
  first = np.concatenate(_labels(itertools.islice(_train(dataset, 10, seed=1), 20)))
  again = np.concatenate(_labels(itertools.islice(_train(dataset, 10, seed=1), 20)))
  other = np.concatenate(_labels(itertools.islice(_train(dataset, 10, seed=2), 20)))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  # Seed and epoch seed the permutation together (SeedSequence([seed,
  # epoch])): the second epoch of seed 1 is not the first of seed 2.
  assert not np.array_equal(first[100:], other[:100])


def _old_formula_labels(num_examples, global_batch_size, seed, num_steps):
  """Global batches [num_steps, B] of the pipeline before grain, for the index dataset."""
  steps = image_batches.steps_per_epoch(num_examples, global_batch_size)
  batches = []
  for step in range(num_steps):
    epoch, step_in_epoch = divmod(step, steps)
    permutation = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(
        num_examples
    )
    start = step_in_epoch * global_batch_size
    batches.append(permutation[start : start + global_batch_size])
  return np.stack(batches)


def test_epoch_permutation_is_the_old_one():
  for seed, epoch in [(0, 0), (3, 7)]:
    np.testing.assert_array_equal(
        image_batches.epoch_permutation(50, seed, epoch),
        np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(50),
    )


@pytest.mark.parametrize('process_count', [1, 2])
def test_batches_follow_the_old_order(process_count):
  # 53 examples, batches of 8: 6 steps per epoch, 5 examples dropped; 14
  # steps cross two epoch boundaries.
  dataset = _index_dataset(53)
  expected = _old_formula_labels(53, 8, seed=11, num_steps=14)
  per_process = [
      list(itertools.islice(_train(dataset, 8, seed=11, process_index=p,
                                   process_count=process_count), 14))
      for p in range(process_count)
  ]
  for step in range(14):
    labels = np.concatenate([batches[step]['label'] for batches in per_process])
    np.testing.assert_array_equal(labels, expected[step])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_follows_the_old_order(num_workers):
  dataset = _index_dataset(53)
  expected = _old_formula_labels(53, 8, seed=11, num_steps=14)
  with _train(dataset, 8, seed=11, num_workers=num_workers) as batches:
    taken = list(itertools.islice(batches, 5))
    state = batches.get_state()
  np.testing.assert_array_equal(np.stack(_labels(taken)), expected[:5])
  assert state == {'step': 5, 'seed': 11, 'global_batch_size': 8, 'num_examples': 53}
  # Resumed with this number of workers, past the epoch boundary at step 6.
  with _train(dataset, 8, seed=11, num_workers=num_workers) as resumed:
    resumed.set_state(state)
    np.testing.assert_array_equal(
        np.stack(_labels(itertools.islice(resumed, 9))), expected[5:]
    )
    assert resumed.get_state()['step'] == 14


def test_background_read_threads_give_the_same_batches():
  dataset = _index_dataset(53)
  expected = _old_formula_labels(53, 8, seed=11, num_steps=14)
  for num_threads in (1, 3):
    with _train(dataset, 8, seed=11, num_threads=num_threads) as batches:
      np.testing.assert_array_equal(
          np.stack(_labels(itertools.islice(batches, 14))), expected
      )


@pytest.mark.parametrize('start_step', [1, 9, 10, 11, 23])
def test_resume_matches_uninterrupted_run(start_step):
  dataset = _index_dataset(107)  # 10 steps per epoch
  uninterrupted = list(itertools.islice(_train(dataset, 10, seed=3), 30))
  interrupted = _train(dataset, 10, seed=3)
  _assert_same_batches(list(itertools.islice(interrupted, start_step)), uninterrupted[:start_step])
  state = interrupted.get_state()
  assert state == {'step': start_step, 'seed': 3, 'global_batch_size': 10, 'num_examples': 107}
  resumed = _train(dataset, 10, seed=3)
  resumed.set_state(json.loads(json.dumps(state)))  # As saved in a checkpoint.
  assert resumed.step == start_step
  _assert_same_batches(list(itertools.islice(resumed, 30 - start_step)), uninterrupted[start_step:])
  # The interrupted iterator carries on as well.
  _assert_same_batches([next(interrupted)], uninterrupted[start_step : start_step + 1])


def test_training_subset_is_the_first_examples():
  subset_batches = _train(_index_dataset(100), 10, seed=4, num_examples=50)
  labels = np.concatenate(_labels(itertools.islice(subset_batches, 10)))
  # Two epochs over examples 0..49, each a permutation.
  np.testing.assert_array_equal(np.sort(labels[:50]), np.arange(50))
  np.testing.assert_array_equal(np.sort(labels[50:]), np.arange(50))
  # Same batches as a dataset that holds only those examples.
  small = np.concatenate(_labels(itertools.islice(_train(_index_dataset(50), 10, seed=4), 10)))
  np.testing.assert_array_equal(labels, small)


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_process_slices_concatenate_to_global_batch(process_count):
  dataset = _index_dataset(70)  # 4 steps of 16 per epoch; 6 dropped
  single = list(itertools.islice(_train(dataset, 16, seed=5), 9))
  per_process = [
      list(itertools.islice(_train(dataset, 16, seed=5, process_index=p,
                                   process_count=process_count), 9))
      for p in range(process_count)
  ]
  for step, batch in enumerate(single):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([batches[step][key] for batches in per_process]), batch[key]
      )
  assert per_process[0][0]['label'].shape == (16 // process_count,)


class _RecordingSource:
  """A random-access source of decoded examples that records what is read."""

  def __init__(self, num_examples, image_shape=(4, 4, 1)):
    self.image_shape = image_shape
    self.num_examples = num_examples
    self.read = []

  def __len__(self):
    return self.num_examples

  def __getitem__(self, index):
    self.read.append(index)
    return {'image': np.full(self.image_shape, index % 256, np.uint8), 'label': index}


def test_each_process_reads_only_its_share():
  source = _RecordingSource(128)  # 8 steps of 16 per epoch
  dataset = image_data.ImageDataset(
      name='recorded', split='train', num_examples=128, image_shape=(4, 4, 1),
      num_classes=128, source=source,
  )
  # Same length and seed, so the same order as the cached index dataset.
  single = list(itertools.islice(_train(_index_dataset(128), 16, seed=5), 8))
  with _train(dataset, 16, seed=5, process_index=1, process_count=2) as batches:
    taken = list(itertools.islice(batches, 3))
  for step, batch in enumerate(taken):
    np.testing.assert_array_equal(batch['label'], single[step]['label'][8:])
    np.testing.assert_array_equal(batch['image'], single[step]['image'][8:])
  # Reading ahead included, process 1 read only examples of its halves.
  own = set(np.concatenate([batch['label'][8:] for batch in single]).tolist())
  assert set(source.read) <= own
  assert len(source.read) == len(set(source.read)) >= 3 * 8


def test_eval_process_slices_concatenate_to_global_batch():
  dataset = _index_dataset(64)
  single_eval = list(image_batches.eval_batches(dataset, 24, process_count=1, process_index=0))
  eval_slices = [
      list(image_batches.eval_batches(dataset, 24, process_count=2, process_index=p))
      for p in range(2)
  ]
  for step, batch in enumerate(single_eval):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(
          np.concatenate([eval_slices[0][step][key], eval_slices[1][step][key]]),
          batch[key],
      )


def test_eval_pads_last_batch_with_mask():
  num_examples = 103
  dataset = _index_dataset(num_examples)
  seen = []
  for process_index in range(2):
    batches = list(
        image_batches.eval_batches(dataset, 40, process_count=2, process_index=process_index)
    )
    assert len(batches) == 3
    for batch in batches:
      assert batch['image'].shape == (20, 4, 4, 1)
      assert batch['mask'].dtype == np.bool_
      seen.append(batch['label'][batch['mask']])
      # Padding is zeros.
      assert not batch['image'][~batch['mask']].any()
      assert not batch['label'][~batch['mask']].any()
    last = batches[-1]
    # Global positions 80..119: process 0 holds 80..99 (all real), process 1
    # holds 100..119 (3 real).
    expected_real = 20 if process_index == 0 else 3
    np.testing.assert_array_equal(last['mask'], np.arange(20) < expected_real)
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(num_examples))


# ----------------------------------------------------------------------------
# Iterator state and worker processes.
# ----------------------------------------------------------------------------


def test_state_is_the_same_in_every_process_and_resumes_another_process_count():
  dataset = _index_dataset(64)
  single = list(itertools.islice(_train(dataset, 16, seed=6), 6))
  two = [_train(dataset, 16, seed=6, process_index=p, process_count=2) for p in range(2)]
  for batches in two:
    list(itertools.islice(batches, 3))
  state = two[0].get_state()
  assert two[1].get_state() == state
  assert state['step'] == 3
  # A run saved by two processes resumes with four.
  four = [_train(dataset, 16, seed=6, process_index=p, process_count=4) for p in range(4)]
  for batches in four:
    batches.set_state(state)
  for step in range(3, 6):
    np.testing.assert_array_equal(
        np.concatenate([next(batches)['label'] for batches in four]), single[step]['label']
    )


def test_state_of_another_run_is_rejected():
  dataset = _index_dataset(64)
  state = _train(dataset, 16, seed=6).get_state()
  with pytest.raises(ValueError, match="seed': 6.*seed': 7"):
    _train(dataset, 16, seed=7).set_state(state)
  with pytest.raises(ValueError, match='global_batch_size'):
    _train(dataset, 8, seed=6).set_state(state)
  with pytest.raises(ValueError, match='num_examples'):
    _train(dataset, 16, seed=6, num_examples=32).set_state(state)
  with pytest.raises(ValueError, match='Not a TrainIterator state'):
    _train(dataset, 16, seed=6).set_state({'next_index': 3})
  with pytest.raises(ValueError, match='step'):
    _train(dataset, 16, seed=6).set_state({**state, 'step': -1})


def test_closed_iterator_raises():
  with _train(_index_dataset(20), 4, seed=0) as batches:
    next(batches)
  with pytest.raises(ValueError, match='closed'):
    next(batches)
  assert isinstance(batches, grain.DatasetIterator)


def test_worker_processes_give_the_same_batches_and_resume():
  # 10 JPEGs, 2 steps per epoch: 6 steps cover 3 epochs.
  _, dataset = _jpeg_dataset()
  in_process = list(itertools.islice(_train(dataset, 4, seed=0), 6))
  with _train(dataset, 4, seed=0, num_workers=2) as workers:
    _assert_same_batches(list(itertools.islice(workers, 3)), in_process[:3])
    state = workers.get_state()
  # The state does not depend on the number of workers.
  with _train(dataset, 4, seed=0, num_workers=2) as resumed:
    resumed.set_state(state)
    _assert_same_batches(list(itertools.islice(resumed, 3)), in_process[3:])
  resumed_in_process = _train(dataset, 4, seed=0)
  resumed_in_process.set_state(state)
  _assert_same_batches(list(itertools.islice(resumed_in_process, 3)), in_process[3:])


# ----------------------------------------------------------------------------
# Global arrays.
# ----------------------------------------------------------------------------


def test_to_global_array():
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  global_batch_size = 2 * len(devices)
  batch = next(
      image_batches.eval_batches(
          _index_dataset(global_batch_size - 1),
          global_batch_size,
          process_count=1,
          process_index=0,
      )
  )
  arrays = image_batches.to_global_array(batch, sharding)
  assert set(arrays) == {'image', 'label', 'mask'}
  for key, array in arrays.items():
    assert isinstance(array, jax.Array)
    assert array.sharding == sharding
    assert array.shape == batch[key].shape
    assert array.dtype == batch[key].dtype
    assert len(array.addressable_shards) == len(devices)
    np.testing.assert_array_equal(np.asarray(array), batch[key])


# ----------------------------------------------------------------------------
# ImageNet-style decoding and cropping, on synthetic images.
# ----------------------------------------------------------------------------


def _smooth_image(height, width):
  """uint8 [height, width, 3] gradients, smooth enough to survive JPEG."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack(
      [255 * x / width, 255 * y / height, 127 + 0 * x], axis=-1
  ).astype(np.uint8)


def _encode(image, image_format, mode=None):
  buffer = io.BytesIO()
  pil_image = Image.fromarray(image)
  if mode is not None:
    pil_image = pil_image.convert(mode)
  pil_image.save(buffer, format=image_format, quality=95)
  return buffer.getvalue()


def test_random_crop_window_respects_ranges():
  rng = np.random.default_rng(0)
  for height, width in [(375, 500), (500, 333), (64, 64)]:
    for _ in range(200):
      top, left, crop_height, crop_width = image_data.random_crop_window(
          height, width, rng
      )
      assert 0 <= top and top + crop_height <= height
      assert 0 <= left and left + crop_width <= width
      area = crop_height * crop_width / (height * width)
      ratio = crop_width / crop_height
      # Rounding to whole pixels moves area and ratio slightly.
      assert 0.07 <= area <= 1.0
      assert 0.7 <= ratio <= 1.4


def test_random_crop_window_is_deterministic_and_falls_back():
  first = image_data.random_crop_window(300, 400, np.random.default_rng(5))
  again = image_data.random_crop_window(300, 400, np.random.default_rng(5))
  assert first == again
  # A 4 x 1000 strip admits no crop in range: central fallback.
  top, left, crop_height, crop_width = image_data.random_crop_window(
      4, 1000, np.random.default_rng(0)
  )
  assert (crop_height, crop_width) == (4, 5)
  assert (top, left) == (0, 497)


def test_center_crop_window():
  assert image_data.center_crop_window(480, 640) == (30, 110, 420, 420)
  assert image_data.center_crop_window(256, 256) == (16, 16, 224, 224)
  with pytest.raises(ValueError, match='crop_fraction'):
    image_data.center_crop_window(10, 10, crop_fraction=1.5)


def test_center_crop_matches_reference():
  image = _smooth_image(300, 400)
  output = image_data.decode_and_center_crop(_encode(image, 'PNG'), 64)
  assert output.shape == (64, 64, 3) and output.dtype == np.uint8
  top, left, side, _ = image_data.center_crop_window(300, 400)
  expected = np.asarray(
      Image.fromarray(image[top : top + side, left : left + side]).resize(
          (64, 64), Image.Resampling.BICUBIC
      )
  )
  assert np.abs(output.astype(int) - expected).max() <= 1


def test_reduced_jpeg_decoding_matches_full_decoding():
  # A 1600 x 1200 JPEG cropped to 64 x 64 is decoded at 1/8 scale.
  image = _smooth_image(1200, 1600)
  encoded = _encode(image, 'JPEG')
  window = (100, 200, 800, 1000)
  output = image_data.decode_and_crop(encoded, 64, lambda h, w: window)
  top, left, crop_height, crop_width = window
  full = Image.open(io.BytesIO(encoded)).convert('RGB')
  expected = np.asarray(
      full.resize(
          (64, 64),
          Image.Resampling.BICUBIC,
          box=(left, top, left + crop_width, top + crop_height),
      )
  )
  assert output.shape == (64, 64, 3)
  assert np.abs(output.astype(int) - expected).mean() < 2


@pytest.mark.parametrize('image_format,mode', [('JPEG', 'L'), ('PNG', 'RGBA'), ('JPEG', 'CMYK')])
def test_decode_converts_to_rgb(image_format, mode):
  encoded = _encode(_smooth_image(50, 70), image_format, mode)
  rng = np.random.default_rng(0)
  output = image_data.decode_and_random_crop(encoded, 24, rng)
  assert output.shape == (24, 24, 3) and output.dtype == np.uint8


def _jpeg_dataset(num_examples=10):
  """Encoded JPEGs of assorted sizes with label = example index, cropped to 16x16."""
  rng = np.random.default_rng(0)
  records = [
      {
          'image': _encode(
              rng.integers(0, 256, (40 + 3 * i, 60 - 2 * i, 3), dtype=np.uint8), 'JPEG'
          ),
          'label': i,
      }
      for i in range(num_examples)
  ]
  dataset = image_data.ImageDataset(
      name='fake_imagenet',
      split='train',
      num_examples=len(records),
      image_shape=(16, 16, 3),
      num_classes=num_examples,
      source=records,
      crop_size=16,
      num_threads=2,
  )
  return records, dataset


def _crops_by_example(batches):
  """{example index: [its crops in stream order]}."""
  crops = {}
  for batch in batches:
    for image, label in zip(batch['image'], batch['label']):
      crops.setdefault(int(label), []).append(image)
  return crops


def test_cropped_dataset_batches():
  records, dataset = _jpeg_dataset()
  train = list(itertools.islice(_train(dataset, 4, seed=0), 6))
  again = list(itertools.islice(_train(dataset, 4, seed=0), 6))
  halves = [
      list(itertools.islice(_train(dataset, 4, seed=0, process_index=p, process_count=2), 6))
      for p in range(2)
  ]
  _assert_same_batches(train, again)
  for step, batch in enumerate(train):
    assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key]
      )
  # The crop of example i in epoch e is drawn from SeedSequence([seed, e, i]):
  # an example seen again in a later epoch is cropped anew, and another seed
  # crops it differently.
  steps = image_batches.steps_per_epoch(len(records), 4)
  for step, batch in enumerate(train):
    for image, label in zip(batch['image'], batch['label']):
      rng = np.random.default_rng(np.random.SeedSequence([0, step // steps, int(label)]))
      np.testing.assert_array_equal(
          image, image_data.decode_and_random_crop(records[label]['image'], 16, rng)
      )
  crops = _crops_by_example(train)
  repeated = [crops[e] for e in crops if len(crops[e]) > 1]
  assert repeated
  assert all(not np.array_equal(c[0], c[1]) for c in repeated)
  other_seed = _crops_by_example(itertools.islice(_train(dataset, 4, seed=1), 6))
  common = set(crops) & set(other_seed)
  assert common
  assert all(not np.array_equal(crops[e][0], other_seed[e][0]) for e in common)

  eval_batch = next(image_batches.eval_batches(dataset, 4, process_count=1, process_index=0))
  np.testing.assert_array_equal(eval_batch['label'], [0, 1, 2, 3])
  np.testing.assert_array_equal(
      eval_batch['image'][1],
      image_data.decode_and_center_crop(records[1]['image'], 16),
  )
  with pytest.raises(ValueError, match='cannot be cached'):
    dataset.cache()


# ----------------------------------------------------------------------------
# The input state in checkpoints (trainer/checkpointing.py).
# ----------------------------------------------------------------------------


def _train_state(step):
  return {'params': {'w': jnp.arange(3.0) + step}, 'step': jnp.asarray(step, jnp.int32)}


def _assert_same_state(actual, expected):
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_input_state_round_trips_through_checkpoints(tmp_path):
  dataset = _index_dataset(50)  # 5 steps per epoch
  reference = list(itertools.islice(_train(dataset, 10, seed=0), 12))
  manager = checkpointing.create_manager(str(tmp_path))
  batches = _train(dataset, 10, seed=0)
  _assert_same_batches(list(itertools.islice(batches, 7)), reference[:7])
  checkpointing.save(manager, 7, _train_state(7), batches)
  next(batches)  # The saved input state was taken at save time.
  manager.wait_until_finished()
  manager.close()
  step_dir = tmp_path / 'checkpoints' / '7'
  assert {'state', 'data_iterator'} <= set(os.listdir(step_dir))
  saved = json.loads((step_dir / 'data_iterator' / 'process_0-of-1.json').read_text())
  assert saved == {'step': 7, 'seed': 0, 'global_batch_size': 10, 'num_examples': 50}

  manager = checkpointing.create_manager(str(tmp_path))
  resumed = _train(dataset, 10, seed=0)
  restored = checkpointing.restore_latest(manager, _train_state(0), resumed)
  _assert_same_state(restored, _train_state(7))
  assert resumed.step == 7
  # Across the epoch boundary at step 10.
  _assert_same_batches(list(itertools.islice(resumed, 5)), reference[7:12])
  _assert_same_state(checkpointing.load_arrays(str(tmp_path)), _train_state(7))
  # Another run's iterator (here: another seed) is rejected.
  with pytest.raises(ValueError, match="seed': 0.*seed': 1"):
    checkpointing.restore_latest(manager, _train_state(0), _train(dataset, 10, seed=1))

  # Saved by two processes, restored by one: grain's handler reads only its
  # own process's file, and any process's state will do.
  iterator_dir = step_dir / 'data_iterator'
  for index in range(2):
    (iterator_dir / f'process_{index}-of-2.json').write_text(json.dumps(saved))
  (iterator_dir / 'process_0-of-1.json').unlink()
  resumed = _train(dataset, 10, seed=0)
  _assert_same_state(checkpointing.restore_latest(manager, _train_state(0), resumed),
                     _train_state(7))
  _assert_same_batches([next(resumed)], reference[7:8])
  (iterator_dir / 'process_1-of-2.json').write_text(json.dumps({**saved, 'step': 6}))
  with pytest.raises(ValueError, match='different states'):
    checkpointing.restore_latest(manager, _train_state(0), _train(dataset, 10, seed=0))
  (iterator_dir / 'process_1-of-2.json').write_text(json.dumps(saved))
  # Here too, another run's iterator is rejected.
  with pytest.raises(ValueError, match='seed'):
    checkpointing.restore_latest(manager, _train_state(0), _train(dataset, 10, seed=1))
  manager.close()


def test_a_checkpoint_without_input_state_positions_the_iterator_at_its_step(tmp_path):
  dataset = _index_dataset(50)
  reference = list(itertools.islice(_train(dataset, 10, seed=0), 9))
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, 7, _train_state(7), _train(dataset, 10, seed=0))
  checkpointing.save(manager, 8, _train_state(8))  # Without an iterator.
  manager.wait_until_finished()
  assert set(os.listdir(tmp_path / 'checkpoints' / '7')) >= {'state', 'data_iterator'}
  _assert_same_state(checkpointing.load_arrays(str(tmp_path), step=7), _train_state(7))
  _assert_same_state(checkpointing.load_arrays(str(tmp_path)), _train_state(8))
  batches = _train(dataset, 10, seed=0)
  _assert_same_state(checkpointing.restore_latest(manager, _train_state(0), batches),
                     _train_state(8))
  # The input order is a function of the step: the iterator continues there.
  assert batches.step == 8
  _assert_same_batches([next(batches)], reference[8:9])
  manager.close()
