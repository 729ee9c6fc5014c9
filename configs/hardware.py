"""Presets for real hardware: `--config configs/hardware.py:PRESET[:BASE[:BASE_ARG]]`.

  PRESET: gpu1 | gpu8 | tpu_v4_32 | tpu_v5e_64       (image models)
          tpu_v5e_1 | tpu_v5e_4 | tpu_v4_8           (language models: the config's streams)
  BASE:   any config module here with get_config(arg), default cifar_paper
  e.g.    configs/hardware.py:tpu_v4_32:imagenet_cutmix:resnet101,maxup
          configs/hardware.py:tpu_v5e_1:ptb_awd_lstm_maxup

A preset fixes the number of devices it expects (the run fails early on any
other count). The image presets fix the per-device batch and bfloat16
computation: the global batch is devices x per-device batch, and the learning
rate follows the linear scaling rule (Goyal et al., 2017): lr = base_lr *
global_batch / base_batch, reached by a linear warm-up over the first 5
epochs whenever the batch grows. The language-model presets keep the config's
batch (AWD-LSTM's 20 or 80 streams, split over the devices), learning rate and
float32 computation: its recipe is tuned to that number of streams.

A TPU preset names its slice's topology (`Preset.topology`, the name
`jax.experimental.topologies.get_topology_desc` takes), so that
`train.py --compile_only` can compile the run's steps for it on a machine
without a TPU. On TPU v4 a device is a chip (megacore: its two TensorCores
act as one); on v5e a chip has one TensorCore.
"""

import importlib
from typing import NamedTuple


class Preset(NamedTuple):
  devices: int  # Devices (= chips on TPU) the run expects.
  per_device_batch: int | None  # None: keep the config's global batch.
  topology: str = ""  # TPU slice topology, e.g. "v4:2x2x4"; "" for GPUs.
  megacore: bool = False  # TPU v4: one device per chip (both TensorCores).


PRESETS = {
    "gpu1": Preset(1, 256),  # One GPU: the paper's batch as is.
    "gpu8": Preset(8, 128),  # A node of 8 GPUs.
    "tpu_v4_32": Preset(16, 64, "v4:2x2x4", megacore=True),  # v4-32: 16 chips, 4 hosts.
    "tpu_v5e_64": Preset(64, 32, "v5e:8x8"),  # v5e-64: 64 chips, 16 hosts.
    # Language models: 20 (PTB) or 80 (WikiText-2) streams.
    "tpu_v5e_1": Preset(1, None, "v5e:1x1"),  # One v5e chip (v5litepod-1).
    "tpu_v5e_4": Preset(4, None, "v5e:2x2"),  # v5litepod-4: 4 chips, one host.
    "tpu_v4_8": Preset(4, None, "v4:2x2x1", megacore=True),  # v4-8: 4 chips, one host.
}
LR_WARMUP_EPOCHS = 5


def parse(arg: str) -> tuple[str, str, str]:
  """(PRESET, BASE, BASE_ARG) of a `PRESET[:BASE[:BASE_ARG]]` argument; BASE defaults to cifar_paper."""
  preset, _, rest = arg.partition(":")
  base, _, base_arg = rest.partition(":")
  if preset not in PRESETS:
    raise ValueError(f"PRESET={preset!r} in {arg!r}; valid: {sorted(PRESETS)}")
  return preset, base or "cifar_paper", base_arg


def get_config(arg: str = "gpu8"):
  preset, base, base_arg = parse(arg)
  try:
    module = importlib.import_module(f"configs.{base}")
  except ModuleNotFoundError:
    raise ValueError(f"BASE={base!r} in {arg!r}: no configs/{base}.py") from None
  config = module.get_config(base_arg) if base_arg else module.get_config()

  spec = PRESETS[preset]
  config.expected_device_count = spec.devices
  config.preset = preset
  if config.task == "language":
    if spec.per_device_batch is not None:
      raise ValueError(f"PRESET={preset!r} fixes a per-device batch for image models; the "
                       "language models' presets keep their streams: "
                       f"{sorted(p for p, s in PRESETS.items() if s.per_device_batch is None)}")
    config.num_devices = spec.devices
    return config

  base_batch = config.batch_size
  if spec.per_device_batch is not None:
    config.batch_size = spec.devices * spec.per_device_batch
  config.eval_batch_size = spec.devices * max(1, config.eval_batch_size // spec.devices)
  config.dtype = "bfloat16"
  scale = config.batch_size / base_batch
  config.learning_rate = config.learning_rate * scale
  if scale > 1:
    config.lr_warmup_epochs = max(config.lr_warmup_epochs, LR_WARMUP_EPOCHS)
  return config
