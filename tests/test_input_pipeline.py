"""Tests for trainer.input_pipeline: loading, ordering, sharding and prefetch."""

import gc
import io
import itertools
from pathlib import Path
import threading

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from trainer import input_pipeline

TFDS_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'tfds'
needs_real_data = pytest.mark.skipif(
    not (TFDS_DIR / 'cifar10').is_dir() or not (TFDS_DIR / 'mnist').is_dir(),
    reason=f'prepared cifar10 and mnist not found under {TFDS_DIR}',
)

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
  return input_pipeline.ImageDataset.from_arrays(
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
      name: input_pipeline.load_dataset(name, 'test', data_dir=TFDS_DIR)
      for name in REAL_DATASETS
  }


@needs_real_data
@pytest.mark.parametrize('name', sorted(REAL_DATASETS))
def test_real_train_split_matches_tfds(name):
  image_shape, num_train, _ = REAL_DATASETS[name]
  # Uncached: decoding 50k-60k examples is the slow part, not needed here.
  train = input_pipeline.load_dataset(name, 'train', TFDS_DIR, cache=False)
  assert train.num_examples == len(train) == num_train
  assert train.image_shape == image_shape
  assert train.num_classes == 10
  assert not train.is_cached

  source = tfds.data_source(name, split='train', data_dir=str(TFDS_DIR))
  for index in (0, num_train - 1):
    example = train[index]
    np.testing.assert_array_equal(example['image'], source[index]['image'])
    assert example['label'] == source[index]['label']

  # A cached subset holds the first examples of the split.
  subset = input_pipeline.load_dataset(name, 'train', TFDS_DIR, num_examples=50)
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
  source = tfds.data_source(name, split='test', data_dir=str(TFDS_DIR))
  for index in (0, 1234, num_test - 1):
    np.testing.assert_array_equal(test.images[index], source[index]['image'])
    assert test.labels[index] == source[index]['label']


@needs_real_data
def test_eval_covers_all_cifar10_test_images(cached_test_splits):
  test = cached_test_splits['cifar10']
  batches = list(input_pipeline.eval_batches(test, 384, process_count=1, process_index=0))
  assert len(batches) == input_pipeline.num_eval_steps(10_000, 384) == 27
  mask = np.concatenate([batch['mask'] for batch in batches])
  assert mask.sum() == 10_000
  labels = np.concatenate([batch['label'] for batch in batches])[mask]
  np.testing.assert_array_equal(labels, test.labels)
  assert all(batch['image'].shape == (384, 32, 32, 3) for batch in batches)


@needs_real_data
def test_real_train_batches():
  train = input_pipeline.load_dataset('cifar10', 'train', TFDS_DIR, num_examples=96)
  batch = next(
      input_pipeline.train_batches(train, 32, seed=0, process_count=1, process_index=0)
  )
  assert batch['image'].shape == (32, 32, 32, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  order = input_pipeline.epoch_permutation(96, seed=0, epoch=0)[:32]
  np.testing.assert_array_equal(batch['image'], train.images[order])


@needs_real_data
def test_data_dir_from_environment(monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(TFDS_DIR))
  dataset = input_pipeline.load_dataset('mnist', 'test', num_examples=10)
  assert dataset.images.shape == (10, 28, 28, 1)


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
    input_pipeline.load_dataset('cifar10', 'train', data_dir=tmp_path)
  message = str(error.value)
  assert 'tfds build cifar10 --file_format=array_record' in message
  assert str(tmp_path) in message
  assert isinstance(error.value, FileNotFoundError)


def test_unknown_name_lists_valid_names():
  assert set(input_pipeline.DATASETS) == {'cifar10', 'cifar100', 'mnist', 'imagenet2012'}
  with pytest.raises(ValueError, match='cifar10.*cifar100.*mnist.*imagenet2012'):
    input_pipeline.load_dataset('svhn', 'train')


@needs_real_data
def test_unknown_split_and_bad_subset():
  with pytest.raises(ValueError, match="Unknown split 'validation'.*test.*train"):
    input_pipeline.load_dataset('mnist', 'validation', TFDS_DIR)
  with pytest.raises(ValueError, match='num_examples'):
    input_pipeline.load_dataset('mnist', 'test', TFDS_DIR, num_examples=10_001)
  with pytest.raises(ValueError, match='cannot|too large'):
    input_pipeline.load_dataset('imagenet2012', 'train', TFDS_DIR, cache=True)


def test_bad_batch_and_process_arguments():
  dataset = _index_dataset(30)
  with pytest.raises(ValueError, match='divisible'):
    input_pipeline.train_batches(dataset, 10, seed=0, process_count=3, process_index=0)
  with pytest.raises(ValueError, match='process_index'):
    input_pipeline.eval_batches(dataset, 10, process_count=2, process_index=2)
  with pytest.raises(ValueError, match='exceeds'):
    input_pipeline.train_batches(dataset, 32, seed=0, process_count=1, process_index=0)
  with pytest.raises(ValueError, match='seed'):
    input_pipeline.train_batches(dataset, 10, seed=-1, process_count=1, process_index=0)
  with pytest.raises(ValueError, match='num_examples'):
    input_pipeline.train_batches(
        dataset, 10, seed=0, num_examples=31, process_count=1, process_index=0
    )
  with pytest.raises(ValueError, match='start_step'):
    input_pipeline.train_batches(
        dataset, 10, seed=0, start_step=-5, process_count=1, process_index=0
    )


# ----------------------------------------------------------------------------
# Order.
# ----------------------------------------------------------------------------


def _train(dataset, global_batch_size, seed, start_step=0, process_index=0, process_count=1):
  return input_pipeline.train_batches(
      dataset,
      global_batch_size,
      seed=seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
  )


def test_each_epoch_is_a_permutation():
  dataset = _index_dataset(103)  # 10 full batches of 10; 3 dropped per epoch
  epochs = list(itertools.islice(_train(dataset, 10, seed=7), 30))
  assert all(batch['label'].shape == (10,) for batch in epochs)
  per_epoch = [np.concatenate(_labels(epochs[i : i + 10])) for i in (0, 10, 20)]
  for labels in per_epoch:
    assert len(np.unique(labels)) == 100
    assert labels.min() >= 0 and labels.max() < 103
  # Each image is the one of its label.
  batch = epochs[0]
  np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], batch['label'] % 256)
  # Epochs are shuffled differently.
  assert not np.array_equal(per_epoch[0], per_epoch[1])
  assert not np.array_equal(per_epoch[1], per_epoch[2])


def test_order_is_fixed_by_seed():
  dataset = _index_dataset(100)
  first = np.concatenate(_labels(itertools.islice(_train(dataset, 10, seed=1), 20)))
  again = np.concatenate(_labels(itertools.islice(_train(dataset, 10, seed=1), 20)))
  other = np.concatenate(_labels(itertools.islice(_train(dataset, 10, seed=2), 20)))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


@pytest.mark.parametrize('start_step', [1, 9, 10, 11, 23])
def test_resume_matches_uninterrupted_run(start_step):
  dataset = _index_dataset(107)  # 10 steps per epoch
  uninterrupted = list(itertools.islice(_train(dataset, 10, seed=3), 30))
  resumed = list(
      itertools.islice(_train(dataset, 10, seed=3, start_step=start_step), 30 - start_step)
  )
  assert len(resumed) == 30 - start_step
  for expected, actual in zip(uninterrupted[start_step:], resumed):
    np.testing.assert_array_equal(actual['label'], expected['label'])
    np.testing.assert_array_equal(actual['image'], expected['image'])


def test_training_subset_is_the_first_examples():
  subset_batches = input_pipeline.train_batches(
      _index_dataset(100), 10, seed=4, num_examples=50, process_count=1, process_index=0
  )
  labels = np.concatenate(_labels(itertools.islice(subset_batches, 10)))
  # Two epochs over examples 0..49, each a permutation.
  np.testing.assert_array_equal(np.sort(labels[:50]), np.arange(50))
  np.testing.assert_array_equal(np.sort(labels[50:]), np.arange(50))
  # Same batches as a dataset that holds only those examples.
  small = np.concatenate(_labels(itertools.islice(_train(_index_dataset(50), 10, seed=4), 10)))
  np.testing.assert_array_equal(labels, small)


def test_process_slices_concatenate_to_global_batch():
  dataset = _index_dataset(64)
  single = list(itertools.islice(_train(dataset, 16, seed=5), 8))
  per_process = [
      list(itertools.islice(_train(dataset, 16, seed=5, process_index=p, process_count=2), 8))
      for p in range(2)
  ]
  for step, batch in enumerate(single):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([per_process[0][step][key], per_process[1][step][key]]),
          batch[key],
      )
  assert per_process[0][0]['label'].shape == (8,)

  single_eval = list(input_pipeline.eval_batches(dataset, 24, process_count=1, process_index=0))
  eval_slices = [
      list(input_pipeline.eval_batches(dataset, 24, process_count=2, process_index=p))
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
        input_pipeline.eval_batches(dataset, 40, process_count=2, process_index=process_index)
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
# Prefetch.
# ----------------------------------------------------------------------------


def test_prefetch_yields_items_in_order():
  with input_pipeline.prefetch(iter(range(10)), buffer_size=3) as prefetcher:
    assert list(prefetcher) == list(range(10))
  assert not prefetcher.thread.is_alive()


def test_prefetch_propagates_worker_exception():
  def failing():
    yield 1
    yield 2
    raise KeyError('broken record')

  prefetcher = input_pipeline.prefetch(failing())
  assert next(prefetcher) == 1
  assert next(prefetcher) == 2
  with pytest.raises(KeyError, match='broken record'):
    next(prefetcher)
  prefetcher.thread.join(timeout=5)
  assert not prefetcher.thread.is_alive()
  with pytest.raises(StopIteration):
    next(prefetcher)


def test_prefetch_close_stops_thread_and_closes_source():
  closed = threading.Event()

  def endless():
    try:
      yield from itertools.count()
    finally:
      closed.set()

  prefetcher = input_pipeline.prefetch(endless(), buffer_size=2)
  assert [next(prefetcher) for _ in range(3)] == [0, 1, 2]
  prefetcher.close()
  assert not prefetcher.thread.is_alive()
  assert closed.is_set()
  with pytest.raises(StopIteration):
    next(prefetcher)


def test_prefetch_stops_when_garbage_collected():
  prefetcher = input_pipeline.prefetch(itertools.count())
  next(prefetcher)
  thread = prefetcher.thread
  del prefetcher
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()


def test_prefetched_train_batches():
  dataset = _index_dataset(40)
  expected = list(itertools.islice(_train(dataset, 8, seed=0), 7))
  with input_pipeline.prefetch(_train(dataset, 8, seed=0)) as prefetcher:
    actual = list(itertools.islice(prefetcher, 7))
  for a, b in zip(actual, expected):
    np.testing.assert_array_equal(a['label'], b['label'])


# ----------------------------------------------------------------------------
# Global arrays.
# ----------------------------------------------------------------------------


def test_to_global_array():
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ('data',))
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  global_batch_size = 2 * len(devices)
  batch = next(
      input_pipeline.eval_batches(
          _index_dataset(global_batch_size - 1),
          global_batch_size,
          process_count=1,
          process_index=0,
      )
  )
  arrays = input_pipeline.to_global_array(batch, sharding)
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
      top, left, crop_height, crop_width = input_pipeline.random_crop_window(
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
  first = input_pipeline.random_crop_window(300, 400, np.random.default_rng(5))
  again = input_pipeline.random_crop_window(300, 400, np.random.default_rng(5))
  assert first == again
  # A 4 x 1000 strip admits no crop in range: central fallback.
  top, left, crop_height, crop_width = input_pipeline.random_crop_window(
      4, 1000, np.random.default_rng(0)
  )
  assert (crop_height, crop_width) == (4, 5)
  assert (top, left) == (0, 497)


def test_center_crop_window():
  assert input_pipeline.center_crop_window(480, 640) == (30, 110, 420, 420)
  assert input_pipeline.center_crop_window(256, 256) == (16, 16, 224, 224)
  with pytest.raises(ValueError, match='crop_fraction'):
    input_pipeline.center_crop_window(10, 10, crop_fraction=1.5)


def test_center_crop_matches_reference():
  image = _smooth_image(300, 400)
  output = input_pipeline.decode_and_center_crop(_encode(image, 'PNG'), 64)
  assert output.shape == (64, 64, 3) and output.dtype == np.uint8
  top, left, side, _ = input_pipeline.center_crop_window(300, 400)
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
  output = input_pipeline.decode_and_crop(encoded, 64, lambda h, w: window)
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
  output = input_pipeline.decode_and_random_crop(encoded, 24, rng)
  assert output.shape == (24, 24, 3) and output.dtype == np.uint8


def test_cropped_dataset_batches():
  rng = np.random.default_rng(0)
  records = [
      {
          'image': _encode(
              rng.integers(0, 256, (40 + 3 * i, 60 - 2 * i, 3), dtype=np.uint8), 'JPEG'
          ),
          'label': i % 3,
      }
      for i in range(10)
  ]
  dataset = input_pipeline.ImageDataset(
      name='fake_imagenet',
      split='train',
      num_examples=len(records),
      image_shape=(16, 16, 3),
      num_classes=3,
      source=records,
      crop_size=16,
      num_threads=2,
  )
  train = list(itertools.islice(_train(dataset, 4, seed=0), 3))
  again = list(itertools.islice(_train(dataset, 4, seed=0), 3))
  halves = [
      list(itertools.islice(_train(dataset, 4, seed=0, process_index=p, process_count=2), 3))
      for p in range(2)
  ]
  for step, batch in enumerate(train):
    assert batch['image'].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(batch['image'], again[step]['image'])
    np.testing.assert_array_equal(
        np.concatenate([halves[0][step]['image'], halves[1][step]['image']]),
        batch['image'],
    )
  # The next epoch crops the same examples differently.
  epoch_0 = input_pipeline.epoch_permutation(10, 0, 0)[:4]
  next_epoch = dataset.get_batch(epoch_0, crop_seed=(0, 1))
  assert not np.array_equal(next_epoch['image'], train[0]['image'])

  eval_batch = next(input_pipeline.eval_batches(dataset, 4, process_count=1, process_index=0))
  np.testing.assert_array_equal(eval_batch['label'], [0, 1, 2, 0])
  np.testing.assert_array_equal(
      eval_batch['image'][1],
      input_pipeline.decode_and_center_crop(records[1]['image'], 16),
  )
  with pytest.raises(ValueError, match='cannot be cached'):
    dataset.cache()
