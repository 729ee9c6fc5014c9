"""RESULTS.md experiment 8: certified robustness on CIFAR-10, Gaussian augmentation vs MaxUp+Gauss.

  --config results/configs/cifar10_gauss.py:M   M = 1 (Gaussian augmentation) | 5 (MaxUp+Gauss)

The paper's certification table (table 8) is on CIFAR-10; this is its
recipe (`configs/cifar10_gauss_paper.py`: noise N(0, sigma^2 I) added in [0, 1]
pixel space after crop + flip, no Cutout, MaxUp after a warm-up of one noisy
copy) at sigma 0.25 with m=5, the smallest m of the paper's grid, shrunk to
a 2-core CPU with experiment 6's recipe (`results/configs/cifar10_scratch.py`: the
airbench network, widths 32/64/128, 295k parameters; SGD with Nesterov
momentum 0.9, lr warmed up over 1 epoch to 0.1 then cosine to 0, weight
decay 5e-4; MaxUp after 2 epochs) on the first 10,000 CIFAR-10 training
images for 20 epochs (1,560 steps of batch 128). Certification (`certify.py`) dominates the budget: a smoothed
prediction with n=10,000 noise samples costs ~10,000 forward passes, so the
network is the fast one, not ResNet-110. Other noise levels by override
(`--config.augment.gaussian_sigma=0.5`). Every 5 epochs: clean test top-1
of the base classifier on all 10,000 test images and top-1 on 2,000
un-augmented training images. Seeds by `--config.seed`.
"""

from configs import image_base
from results.configs import cifar10_scratch

NUM_COPIES = (1, 5)


def get_config(arg: str = "5"):
  num_copies = image_base.parse_num_copies(arg, NUM_COPIES, "Gaussian augmentation")
  config = cifar10_scratch.get_config("1")  # Its network, optimiser and schedule.
  config.num_train_examples = 10_000
  config.train_eval_examples = 2000
  config.num_epochs = 20
  config.augment.cutout_length = 0
  config.augment.gaussian_sigma = 0.25
  config.maxup.num_copies = num_copies
  config.eval_every_epochs = 5
  return config
