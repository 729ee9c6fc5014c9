"""The paper's certified-robustness experiment (section 4.4, table 8).

  --config configs/cifar10_gauss_paper.py:SIGMA,M

MaxUp+Gauss trains on the worst of M copies x + e_i, e_i ~ N(0, SIGMA^2 I),
with the noise added in [0, 1] pixel space before normalisation, so the
smoothed classifier g(x) = argmax_c P(f(x + e) = c) of Cohen et al. (2019)
is defined on raw pixels. `certify.py` certifies the result with the same SIGMA.

  SIGMA: 0.12 | 0.25 | 0.5 | 1.0      (the paper's grid)
  M:     5 | 25 | 50 | 100 | 150      (the paper's grid), or 1: the Gaussian
         augmentation baseline of Cohen et al. (one noisy copy per example)

All: CIFAR-10, ResNet-110, the training pipeline of Salman et al. (2019) that
the paper follows: 150 epochs, batch 256, SGD momentum 0.9, weight decay 1e-4,
lr 0.1 divided by 10 after epochs 50 and 100, random crop and flip before the
noise, no Cutout. MaxUp starts after 5 epochs of standard (m=1) training.

The test top-1 the trainer logs is the base classifier's on clean images;
the smoothed classifier's accuracy is the certified accuracy at radius 0.
"""

from configs import image_base

SIGMAS = (0.12, 0.25, 0.5, 1.0)
NUM_COPIES = (1, 5, 25, 50, 100, 150)  # 1 = Gaussian augmentation (Cohen et al.)


def get_config(arg: str = "0.25,5"):
  parts = arg.split(",")
  if len(parts) != 2:
    raise ValueError(f"config argument {arg!r}; expected SIGMA,M, e.g. 0.25,5")
  try:
    sigma = float(parts[0])
  except ValueError:
    sigma = parts[0]
  if sigma not in SIGMAS:
    raise ValueError(f"SIGMA={parts[0]!r} in {arg!r}; valid: {list(SIGMAS)}")
  try:
    num_copies = int(parts[1])
  except ValueError:
    num_copies = parts[1]
  if num_copies not in NUM_COPIES:
    raise ValueError(f"M={parts[1]!r} in {arg!r}; valid: {list(NUM_COPIES)} "
                     "(1 = Gaussian augmentation baseline)")

  config = image_base.get_config()
  config.dataset = "cifar10"
  config.model = "resnet110"
  config.batch_size = 256
  config.num_epochs = 150
  config.learning_rate = 0.1
  config.lr_schedule = "piecewise"
  config.lr_decay_epochs = (50, 100)
  config.lr_decay_factor = 0.1
  config.weight_decay = 1e-4
  config.augment.flip = True
  config.augment.crop_padding = 4
  config.augment.gaussian_sigma = sigma
  config.augment.cutout_length = 0
  config.maxup.num_copies = num_copies
  config.maxup.warmup_epochs = 5
  return config
