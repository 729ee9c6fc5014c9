"""MaxUp+Gauss on CIFAR-10 with ResNet-20, sized for a laptop CPU.

The recipe of `cifar10_gauss_paper.py` (sigma 0.25 in [0, 1] pixel space,
crop and flip before the noise, no Cutout) shrunk to minutes on two cores:
m=5, 10,000 training images, 4 epochs of which the first trains on one noisy
copy, cosine learning rate. Other noise levels or copy counts by override,
e.g. `--config.augment.gaussian_sigma=0.5 --config.maxup.num_copies=25`.
"""

from configs import image_base


def get_config():
  config = image_base.get_config()
  config.dataset = "cifar10"
  config.model = "resnet20"
  config.num_train_examples = 10_000
  config.batch_size = 128
  config.num_epochs = 4
  config.lr_schedule = "cosine"
  config.weight_decay = 5e-4
  config.augment.flip = True
  config.augment.crop_padding = 4
  config.augment.gaussian_sigma = 0.25
  config.augment.cutout_length = 0
  config.maxup.num_copies = 5
  config.maxup.warmup_epochs = 1
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  return config
