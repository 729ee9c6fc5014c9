"""Presets for real hardware: `--config configs/hardware.py:PRESET[:BASE[:BASE_ARG]]`.

  PRESET: gpu1 | gpu8 | tpu_v4_32 | tpu_v5e_64
  BASE:   any config module here with get_config(arg), default cifar_paper
  e.g.    configs/hardware.py:tpu_v4_32:imagenet_cutmix:resnet101,maxup

A preset fixes the number of devices it expects (the run fails early on any
other count), the per-device batch and bfloat16 computation. The global batch
is devices x per-device batch, and the learning rate follows the linear
scaling rule (Goyal et al., 2017): lr = base_lr * global_batch / base_batch,
reached by a linear warm-up over the first 5 epochs whenever the batch grows.
"""

import importlib

# name: (devices, per-device batch)
PRESETS = {
    "gpu1": (1, 256),  # One GPU: the paper's batch as is.
    "gpu8": (8, 128),  # A node of 8 GPUs.
    "tpu_v4_32": (16, 64),  # v4-32: 16 chips (megacore), 4 hosts.
    "tpu_v5e_64": (64, 32),  # v5e-64: 64 chips, 16 hosts.
}
LR_WARMUP_EPOCHS = 5


def get_config(arg: str = "gpu8"):
  preset, _, rest = arg.partition(":")
  base, _, base_arg = rest.partition(":")
  if preset not in PRESETS:
    raise ValueError(f"PRESET={preset!r} in {arg!r}; valid: {sorted(PRESETS)}")
  base = base or "cifar_paper"
  try:
    module = importlib.import_module(f"configs.{base}")
  except ModuleNotFoundError:
    raise ValueError(f"BASE={base!r} in {arg!r}: no configs/{base}.py") from None
  config = module.get_config(base_arg) if base_arg else module.get_config()

  devices, per_device_batch = PRESETS[preset]
  base_batch = config.batch_size
  config.expected_device_count = devices
  config.batch_size = devices * per_device_batch
  config.eval_batch_size = devices * max(1, config.eval_batch_size // devices)
  config.dtype = "bfloat16"
  scale = config.batch_size / base_batch
  config.learning_rate = config.learning_rate * scale
  if scale > 1:
    config.lr_warmup_epochs = max(config.lr_warmup_epochs, LR_WARMUP_EPOCHS)
  return config
