"""Training-input images/s: grain vs the hand-written pipeline it replaced; JPEGs in grain workers.

Prints one table of images/s taken by the training loop's `next()`:

  cifar10, hand-written:  the generator + prefetch thread that
                          `image_batches.train_iterator` replaced (copied here
                          for this comparison only): one numpy permutation per
                          epoch, one gather per batch, a background thread;
  cifar10, grain:         `image_batches.train_iterator` on the same cached
                          real CIFAR-10 train split: grain elements are whole
                          batches (the same numpy permutation per epoch, one
                          gather per batch), gathered by `next()` itself (its
                          default, num_threads=0), and with one grain read
                          thread gathering ahead (num_threads=1);
  jpeg, N workers:        `train_iterator` on synthetic ImageNet-sized JPEGs
                          (500x375 px, quality 90, in an array_record file):
                          decode + random-resized crop to 224x224 with 0
                          workers (threads in this process), 1 and 2 grain
                          worker processes.

Timing is interleaved: each round times every variant once, so load from
other processes hits all of them alike; the table has per-variant medians.
The CIFAR-10 iterators live through all rounds (each round times the next
batches). Each JPEG round starts fresh iterators, so the table also gives the
start-up time to the first batch (worker processes start, import the project
and unpickle the pipeline); the rate is over the batches after the first.

  python -m benchmarks.grain_input
  python -m benchmarks.grain_input --quick    # a smoke run, under 30 s
"""

from __future__ import annotations

import argparse
import io
import os
import queue
import tempfile
import threading
import time

from array_record.python import array_record_module
import grain
import numpy as np
from PIL import Image

from benchmarks import common
from trainer import image_batches, image_data, timing

DATA_DIR = os.path.join(common.REPO, "..", "shared", "tfds")
# ImageNet's typical photo: 500x375 px (width x height), saved at quality ~90.
JPEG_SIZE = (500, 375)
JPEG_QUALITY = 90
CROP_SIZE = 224


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", default=DATA_DIR)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and one JPEG round: a smoke run in under 30 s")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=128, help="CIFAR-10 batch")
  parser.add_argument("--cifar_examples", type=int, default=0,
                      help="train on the first N CIFAR-10 examples; 0 = all 50000")
  parser.add_argument("--cifar_batches", type=int, default=100,
                      help="CIFAR-10 batches timed per round and pipeline")
  parser.add_argument("--jpeg_images", type=int, default=256,
                      help="synthetic JPEGs in the array_record file")
  parser.add_argument("--jpeg_batch_size", type=int, default=32)
  parser.add_argument("--jpeg_batches", type=int, default=16,
                      help="JPEG batches timed per round and worker count, after the first")
  parser.add_argument("--workers", default="0,1,2", help="grain worker counts for the JPEG rows")
  args = parser.parse_args(argv)
  if args.quick:
    args.rounds = min(args.rounds, 3)
    args.cifar_examples = args.cifar_examples or 10_000
    args.cifar_batches = min(args.cifar_batches, 20)
    args.jpeg_images = min(args.jpeg_images, 48)
    args.jpeg_batch_size = min(args.jpeg_batch_size, 8)
    args.jpeg_batches = min(args.jpeg_batches, 3)
  args.workers = [int(w) for w in args.workers.split(",")]
  return args


# ----------------------------------------------------------------------------
# The hand-written pipeline that train_iterator replaced, for comparison only.
# ----------------------------------------------------------------------------


def hand_written_batches(dataset, global_batch_size, seed):
  """One process's batches as the pre-grain `train_batches` made them."""
  num_steps = image_batches.steps_per_epoch(dataset.num_examples, global_batch_size)
  epoch = 0
  while True:
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    permutation = rng.permutation(dataset.num_examples)
    for step in range(num_steps):
      indices = permutation[step * global_batch_size:(step + 1) * global_batch_size]
      yield dataset.get_batch(indices)
    epoch += 1


def thread_prefetch(iterator, buffer_size=2):
  """The pre-grain `prefetch`, reduced to its work: a daemon thread filling a bounded queue."""
  buffer = queue.Queue(maxsize=buffer_size)

  def fill():
    for item in iterator:
      buffer.put(item)

  threading.Thread(target=fill, daemon=True).start()
  while True:
    yield buffer.get()


# ----------------------------------------------------------------------------
# Synthetic ImageNet-style JPEGs.
# ----------------------------------------------------------------------------


def write_jpegs(path, num_images, seed=0):
  """`num_images` photo-like JPEGs (smooth colour fields plus grain) into an array_record file.

  Returns the mean encoded size in bytes.
  """
  rng = np.random.default_rng(seed)
  width, height = JPEG_SIZE
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  total = 0
  for _ in range(num_images):
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    writer.write(buffer.getvalue())
    total += buffer.tell()
  writer.close()
  return total / num_images


class JpegRecords:
  """{'image': JPEG bytes, 'label': int} records of an array_record file, by index.

  Picklable (it holds only the path), so grain workers open the file themselves.
  """

  def __init__(self, path):
    self._path = path
    self._source = grain.sources.ArrayRecordDataSource([path])

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return {"image": self._source[index], "label": index % 1000}

  def __reduce__(self):
    return JpegRecords, (self._path,)


def jpeg_dataset(path):
  records = JpegRecords(path)
  return image_data.ImageDataset(
      name="synthetic_jpeg", split="train", num_examples=len(records),
      image_shape=(CROP_SIZE, CROP_SIZE, 3), num_classes=1000, source=records,
      crop_size=CROP_SIZE)


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------


def time_batches(iterator, num_batches):
  """Seconds to take `num_batches` batches; also checks that they are batches."""
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
  return seconds


def jpeg_round(dataset, batch_size, num_workers, num_batches):
  """(seconds to the first batch, images/s over the next `num_batches`) of a fresh iterator."""
  start = time.perf_counter()
  with image_batches.train_iterator(dataset, batch_size, seed=0, num_workers=num_workers,
                                    process_index=0, process_count=1) as batches:
    first = next(batches)
    startup = time.perf_counter() - start
    assert first["image"].shape == (batch_size, CROP_SIZE, CROP_SIZE, 3)
    rate = num_batches * batch_size / time_batches(batches, num_batches)
  return startup, rate


def main(args):
  start = time.perf_counter()
  cifar = image_data.load_dataset("cifar10", "train", args.data_dir,
                                  num_examples=args.cifar_examples or None)
  load_seconds = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "jpegs.array_record")
    mean_bytes = write_jpegs(path, args.jpeg_images)
    jpegs = jpeg_dataset(path)
    timing.print_environment(
        cifar10_train_examples=cifar.num_examples, cifar10_load_and_decode_s=round(load_seconds, 1),
        jpeg_images=f"{args.jpeg_images} x {JPEG_SIZE[0]}x{JPEG_SIZE[1]} px, quality "
                    f"{JPEG_QUALITY}, mean {mean_bytes / 1000:.0f} kB",
        decode_threads=jpegs.num_threads, rounds=args.rounds, quick=args.quick)

    cifar_pipelines = {
        "hand-written": thread_prefetch(hand_written_batches(cifar, args.batch_size, seed=0)),
        "grain": image_batches.train_iterator(cifar, args.batch_size, seed=0,
                                              process_index=0, process_count=1),
        "grain, 1 read thread": image_batches.train_iterator(
            cifar, args.batch_size, seed=0, process_index=0, process_count=1, num_threads=1),
    }
    cifar_times = timing.interleaved_medians(
        {name: (lambda it=it: time_batches(it, args.cifar_batches))
         for name, it in cifar_pipelines.items()},
        repeats=args.rounds)
    cifar_rates = {name: args.cifar_batches * args.batch_size / timing.median(times)
                   for name, times in cifar_times.items()}
    for name, pipeline in cifar_pipelines.items():
      if name.startswith("grain"):
        pipeline.close()

    jpeg_rounds = 1 if args.quick else args.rounds
    jpeg_results = {w: [] for w in args.workers}
    for _ in range(jpeg_rounds):
      for num_workers in args.workers:
        jpeg_results[num_workers].append(
            jpeg_round(jpegs, args.jpeg_batch_size, num_workers, args.jpeg_batches))

  baseline = cifar_rates["hand-written"]
  rows = [
      ["cifar10: hand-written generator + prefetch thread (before grain)", args.batch_size,
       "-", cifar_rates["hand-written"], 1.0, "-"],
      ["cifar10: grain train_iterator (cached arrays, gathered by next(), the default)",
       args.batch_size, 0, cifar_rates["grain"], cifar_rates["grain"] / baseline, "-"],
      ["cifar10: grain train_iterator (cached arrays, num_threads=1: a grain read thread)",
       args.batch_size, 0, cifar_rates["grain, 1 read thread"],
       cifar_rates["grain, 1 read thread"] / baseline, "-"],
  ]
  for num_workers, results in jpeg_results.items():
    startups, rates = zip(*results)
    threads = max(1, jpegs.num_threads // max(1, num_workers))
    where = (f"{threads} threads in this process" if num_workers == 0
             else f"{num_workers} worker process{'es' if num_workers > 1 else ''} x "
                  f"{threads} thread{'s' if threads > 1 else ''}")
    rows.append([f"jpeg {JPEG_SIZE[0]}x{JPEG_SIZE[1]} -> random-resized crop {CROP_SIZE}: "
                 f"grain, {where}", args.jpeg_batch_size, num_workers, timing.median(rates),
                 "-", timing.median(startups)])
  print(f"# medians of {args.rounds} rounds (cifar10), {jpeg_rounds} (jpeg); "
        f"loadavg after: {'%.2f %.2f %.2f' % os.getloadavg()}")
  common.print_table(["input", "batch", "workers", "images/s", "vs hand-written",
                      "first batch s"], rows)


if __name__ == "__main__":
  main(parse_args())
