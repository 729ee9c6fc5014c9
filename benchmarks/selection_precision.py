"""How often does bfloat16 selection pick the same copy as float32 selection?

MaxUp's m selection passes only rank copies, so they may run in a lower
precision than the gradient pass (`config.maxup.selection_dtype`). This
script takes a trained image run, draws m copies of test images with the
run's own augmentation, ranks them with the model in float32 and in
bfloat16, and prints how often the worst copy agrees.

  python -m benchmarks.selection_precision --workdir runs/cifar10_resnet20 --num_copies 4
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from maxup_jax import losses
from trainer import checkpointing, image, image_data

WORKDIR = flags.DEFINE_string("workdir", None, "A finished image training run.", required=True)
NUM_COPIES = flags.DEFINE_integer("num_copies", 4, "Copies per example (m).")
NUM_IMAGES = flags.DEFINE_integer("num_images", 2000, "Test images to draw copies of.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 250, "Images per batch.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the copies.")


def copy_losses(params, batch_stats, images, labels, keys, *, model, augmentation):
  """[m, B] losses of the m copies, BatchNorm in training mode as in the selection pass."""

  def one_copy(keys):
    augmented, soft = augmentation(keys, images, labels)
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, augmented,
                            train=True, mutable=["batch_stats"])
    return losses.softmax_cross_entropy(logits, soft)

  return jax.vmap(one_copy)(keys)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  with open(os.path.join(WORKDIR.value, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  restored = checkpointing.load_arrays(WORKDIR.value)
  data = image_data.load_dataset(config.dataset, "test", config.data_dir or None,
                                 num_examples=NUM_IMAGES.value)
  augmentation = image.make_augmentation(config.augment, config.dataset, data.num_classes)
  results = {}
  for dtype in ("float32", "bfloat16"):
    model = image.build_model(config, data.num_classes, dtype)
    results[dtype] = jax.jit(functools.partial(copy_losses, model=model,
                                               augmentation=augmentation))

  agree, total, gaps = 0, 0, []
  started = time.time()
  key = jax.random.key(SEED.value)
  m, b = NUM_COPIES.value, BATCH_SIZE.value
  for start in range(0, data.num_examples - b + 1, b):
    images = jnp.asarray(data.images[start:start + b])
    labels = jnp.asarray(data.labels[start:start + b])
    keys = jax.random.split(jax.random.fold_in(key, start), m * b).reshape(m, b)
    f32 = results["float32"](restored["params"], restored["batch_stats"], images, labels, keys)
    bf16 = results["bfloat16"](restored["params"], restored["batch_stats"], images, labels, keys)
    same = jnp.argmax(f32, 0) == jnp.argmax(bf16, 0)
    agree += int(same.sum())
    total += b
    # How close were the two best copies where the choice differed?
    top2 = jnp.sort(f32, axis=0)[-2:]
    gaps.append(np.asarray((top2[1] - top2[0])[~same]))
  gaps = np.concatenate(gaps)
  print(f"run: {WORKDIR.value} (model {config.model}, step {int(restored['step'])})")
  print(f"m={m}, {total} test images, augmentation as trained, {time.time() - started:.0f} s")
  print("| selection dtype | same worst copy as float32 | disagreements | median f32 loss gap "
        "of the two worst copies where they disagree |")
  print("|---|---|---|---|")
  print(f"| bfloat16 | {agree / total:.2%} | {total - agree} | "
        f"{np.median(gaps) if len(gaps) else float('nan'):.4f} |")


if __name__ == "__main__":
  app.run(main)
