"""MaxUp+Gauss on MNIST with a small CNN, sized for a few minutes on a laptop CPU.

The certified-robustness recipe of `cifar10_gauss_paper.py` shrunk to MNIST:
m=5 copies x + e_i, e_i ~ N(0, 0.25^2 I) in [0, 1] pixel space, no crop, flip
or Cutout (mirrored digits are other digits), 2 epochs of which the first
trains on one noisy copy. Other noise levels or copy counts by override, e.g.
`--config.augment.gaussian_sigma=0.5 --config.maxup.num_copies=25`.
"""

from configs import image_base


def get_config():
  config = image_base.get_config()
  config.dataset = "mnist"
  config.model = "small_cnn"
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 2
  config.learning_rate = 0.05
  config.lr_schedule = "cosine"
  config.weight_decay = 5e-4
  config.augment.flip = False
  config.augment.crop_padding = 0
  config.augment.gaussian_sigma = 0.25
  config.augment.cutout_length = 0
  config.maxup.num_copies = 5
  config.maxup.warmup_epochs = 1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
