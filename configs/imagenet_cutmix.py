"""The paper's ImageNet fine-tune (tables 1-2): `--config configs/imagenet_cutmix.py:MODEL[,METHOD]`.

  MODEL:  resnet50 | resnet101
  METHOD: maxup (MaxUp+CutMix, m=4; default) | cutmix (m=1)

A pre-trained model (set --config.init_checkpoint=WORKDIR_OF_PRETRAINING) is
fine-tuned for 20 epochs at a constant lr 1e-5, batch 256, CutMix alpha 1.0,
random-resized 224x224 crops and flips, no MaxUp warm-up (the model is
already trained). For the EfficientNet recipe add --config.freeze_batch_norm=True.
"""

from configs import image_base

MODELS = ("resnet50", "resnet101")
METHODS = ("maxup", "cutmix")


def get_config(arg: str = "resnet50,maxup"):
  model, _, method = arg.partition(",")
  method = method or "maxup"
  if model not in MODELS:
    raise ValueError(f"MODEL={model!r} in {arg!r}; valid: {list(MODELS)}")
  if method not in METHODS:
    raise ValueError(f"METHOD={method!r} in {arg!r}; valid: {list(METHODS)}")

  config = image_base.get_config()
  config.dataset = "imagenet2012"
  config.model = model
  config.batch_size = 256
  config.eval_batch_size = 250
  # Decoding and random-resized-cropping 256 JPEGs a step is CPU-heavy: decode
  # in worker processes (fewer on hosts with fewer cores).
  config.input_workers = 8
  config.num_epochs = 20
  config.learning_rate = 1e-5
  config.lr_schedule = "constant"
  config.weight_decay = 1e-4
  config.augment.crop_padding = 0  # Flip only: the input pipeline random-resized-crops.
  config.augment.cutout_length = 0
  config.augment.cutmix_alpha = 1.0
  config.maxup.num_copies = 4 if method == "maxup" else 1
  config.maxup.warmup_epochs = 0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
