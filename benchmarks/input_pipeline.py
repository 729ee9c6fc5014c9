"""Input pipeline throughput against the training step's consumption, on the real CIFAR-10.

Measures, in one process, images/s of

  pipeline:  tfds (array_record, decoded once into memory) -> grain
             train_iterator (one gather of the next batch of the epoch's
             permutation, in the calling thread) -> device array -> on-device
             augmentation
             (crop + flip + normalise + Cutout, jitted, m copies), blocking on
             the result: everything the training loop does except the step;
  step:      the training step alone on a batch already on the device;
  loop:      the training loop's own pattern: next batch from the iterator,
             to_global_array, step; blocking only at the end.

The pipeline is not the bottleneck when pipeline images/s are well above the
step's (headroom = pipeline / step) and the loop runs as fast as the step
alone. benchmarks/grain_input.py times the input pipeline on its own.

  python -m benchmarks.input_pipeline
  python -m benchmarks.input_pipeline --model resnet20 --num_copies 4 --steps 10
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from benchmarks import common
from trainer import image, image_batches, image_data, timing

DATA_DIR = os.path.join(common.REPO, "..", "shared", "tfds")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", default=DATA_DIR)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_copies", type=int, default=4, help="m of the MaxUp step")
  parser.add_argument("--pipeline_batches", type=int, default=100)
  parser.add_argument("--steps", type=int, default=8, help="timed training steps")
  return parser.parse_args(argv)


def main(args):
  start = time.perf_counter()
  dataset = image_data.load_dataset("cifar10", "train", args.data_dir)
  load_seconds = time.perf_counter() - start
  num_copies = args.num_copies
  config = common.with_maxup(common.benchmark_config(args.model, args.batch_size),
                             num_copies=num_copies)
  steps = common.image_steps(config)
  augmentation = image.make_augmentation(config.augment, config.dataset,
                                         steps.facts.num_classes)

  @jax.jit
  def augment(batch, key):
    images = batch["image"]
    keys = jax.random.split(key, num_copies * images.shape[0])
    keys = keys.reshape(num_copies, images.shape[0])
    return jax.vmap(lambda k: augmentation(k, images, batch["label"]))(keys)

  timing.print_environment(model=args.model, batch_size=args.batch_size,
                           num_copies=num_copies, train_examples=dataset.num_examples,
                           dataset_load_and_decode_s=round(load_seconds, 1))

  def batches():
    return image_batches.train_iterator(dataset, args.batch_size, seed=0)

  key = jax.random.key(0)
  with batches() as source:
    jax.block_until_ready(augment(image_batches.to_global_array(next(source),
                                                                steps.data_sharding), key))
    start = time.perf_counter()
    for i in range(args.pipeline_batches):
      out = augment(image_batches.to_global_array(next(source), steps.data_sharding),
                    jax.random.fold_in(key, i))
      jax.block_until_ready(out)
    pipeline_seconds = time.perf_counter() - start
  pipeline_rate = args.pipeline_batches * args.batch_size / pipeline_seconds

  rows = [["pipeline (grain batch gather, to device, augment m copies)",
           pipeline_rate, "-", "-"]]
  for m in sorted({1, num_copies}):
    step_fn = steps.train_steps[m]
    resident = common.image_runner(steps, step_fn, common.random_batch(steps, args.batch_size))
    resident()  # Compiles.
    step_times = []
    loop_state = steps.init_state()
    with batches() as source:
      loop_state, metrics = step_fn(
          loop_state, image_batches.to_global_array(next(source), steps.data_sharding), key)
      jax.block_until_ready(metrics)
      # Interleave: one resident-batch step, then `steps` loop steps, alternately by halves.
      loop_seconds = 0.0
      for half in range(2):
        for _ in range(args.steps // 2):
          step_times.append(timing.timed(resident))
        start = time.perf_counter()
        for i in range(args.steps // 2):
          batch = image_batches.to_global_array(next(source), steps.data_sharding)
          loop_state, metrics = step_fn(loop_state, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(metrics)
        loop_seconds += time.perf_counter() - start
    step_rate = args.batch_size / timing.median(step_times)
    loop_rate = (args.steps // 2) * 2 * args.batch_size / loop_seconds
    label = "standard" if m == 1 else f"MaxUp two-pass m={m}"
    rows.append([f"{label} step, batch resident on device", step_rate,
                 pipeline_rate / step_rate, "-"])
    rows.append([f"{label} training loop (pipeline + step)", loop_rate, "-",
                 loop_rate / step_rate])
  print(f"# {args.model}, batch {args.batch_size}, real CIFAR-10 train split; "
        f"loadavg after: {'%.2f %.2f %.2f' % os.getloadavg()}")
  common.print_table(["what", "images/s", "pipeline headroom (pipeline / step)",
                      "loop / step alone"], rows)


if __name__ == "__main__":
  main(parse_args())
