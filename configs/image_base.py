"""The base image-classification config; every other image config derives from it.

Defaults are the paper's CIFAR recipe (section 4.2): ResNet-110, MaxUp+Cutout
with m=4, 200 epochs, batch 256, SGD momentum 0.9, lr 0.1 divided by 10 after
epochs 100 and 150, weight decay 2.5e-4, 5 epochs of standard augmentation
before MaxUp starts.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.task = "image"

  # Data: a tfds dataset in array_record format. data_dir "" means
  # $TFDS_DATA_DIR, else tfds's default folder.
  config.dataset = "cifar10"
  config.data_dir = ""
  config.num_train_examples = 0  # > 0: train on the first N examples only.
  config.num_eval_examples = 0  # > 0: evaluate on the first N test examples only.
  # > 0: at every evaluation also evaluate the first N training examples,
  # un-augmented: loss, top-1 and the input-gradient norm ("train_clean").
  config.train_eval_examples = 0
  # grain worker processes that prepare the training batches (decoding and
  # cropping); 0 prepares them in the training process, in background threads.
  # Workers take seconds to start and pay off for JPEG datasets (ImageNet),
  # not for the in-memory CIFAR / MNIST arrays. Batches are the same either way.
  config.input_workers = 0

  config.model = "resnet110"
  config.dtype = "float32"  # Computation dtype; parameters stay float32.
  config.remat = False

  config.num_devices = 0  # 0: every device of every process; n: the first n (one process).
  config.expected_device_count = 0  # > 0: fail unless the run sees exactly this many devices.
  config.batch_size = 256  # Global, over all devices and processes.
  config.eval_batch_size = 500
  config.num_epochs = 200.0

  config.learning_rate = 0.1
  config.lr_schedule = "piecewise"  # piecewise | cosine | constant
  config.lr_decay_epochs = (100, 150)
  config.lr_decay_factor = 0.1
  config.lr_warmup_epochs = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 2.5e-4

  # Fine-tuning: start from another run's parameters (its workdir); optionally
  # keep BatchNorm frozen (scale, bias and statistics).
  config.init_checkpoint = ""
  config.freeze_batch_norm = False

  # The perturbation P(.|x) that MaxUp draws its copies from; 0 turns a step off.
  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True  # Random mirror, and with crop_padding > 0 a random crop.
  config.augment.crop_padding = 4
  config.augment.gaussian_sigma = 0.0  # In [0, 1] pixel space.
  config.augment.cutout_length = 16
  config.augment.cutmix_alpha = 0.0
  config.augment.mixup_alpha = 0.0

  config.maxup = ml_collections.ConfigDict()
  config.maxup.num_copies = 4  # 1 = standard augmentation.
  config.maxup.mode = "two_pass"  # two_pass | single_pass
  config.maxup.warmup_epochs = 5.0  # Standard augmentation first, as the paper does.
  # two_pass only: rank the copies with the model computing in this dtype
  # ("" = config.dtype); e.g. "bfloat16" selection for a float32 gradient pass.
  config.maxup.selection_dtype = ""
  # Copies one pass evaluates; the passes run in sequence. 1 partitions over a
  # sharded batch like the standard step; k > 1 vmaps k copies per pass (one
  # device only: a vmapped convolution's copies are not split over devices).
  config.maxup.copies_per_pass = 1

  config.seed = 0
  config.log_every_steps = 50
  config.eval_every_epochs = 1.0
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.nonfinite = "stop"  # A NaN/inf loss: "stop" (naming the step) or "skip" the update.
  config.profile_steps = 0  # > 0: jax.profiler trace of that many steps in workdir/profile.
  return config


def parse_num_copies(arg: str, valid: tuple[int, ...], baseline: str) -> int:
  """The M of a `--config FILE.py:M` argument, one of `valid`; M=1 names `baseline`."""
  try:
    num_copies = int(arg)
  except ValueError:
    num_copies = arg
  if num_copies not in valid:
    raise ValueError(f"M={arg!r}; valid: {list(valid)} (1 = {baseline})")
  return num_copies
