"""RESULTS.md experiments 3 and 4: Gaussian augmentation vs MaxUp+Gauss on MNIST, sigma 0.5.

  --config results/configs/mnist_gauss.py:M    M = 1 (Gaussian augmentation) | 5 (MaxUp+Gauss)

`configs/mnist_gauss.py` at sigma 0.5, the middle of the paper's grid, so certified
radii up to ~1.6 are reachable with n=10,000 samples; M=5 is the smallest m
of the paper's grid. Everything but M is shared: the small CNN, 2 epochs of
all 60,000 images, batch 128, lr warmed up linearly over 0.2 epochs to 0.05
then cosine, weight decay 5e-4, noise in [0, 1] pixel space, no
crop/flip/Cutout; MaxUp starts after one epoch of one noisy copy per image.
(Without the lr warm-up, or with MaxUp from 0.1 epochs, some seeds collapsed
to a constant output; RESULTS.md shows those runs.) Eight times
per run the first 2,048 training images are scored without noise, with the
norm of the loss's input gradient (the quantity of the paper's theorem 1).
Seeds by `--config.seed`.
"""

from configs import image_base, mnist_gauss

NUM_COPIES = (1, 5)


def get_config(arg: str = "5"):
  num_copies = image_base.parse_num_copies(arg, NUM_COPIES, "Gaussian augmentation")
  config = mnist_gauss.get_config()
  config.augment.gaussian_sigma = 0.5
  config.maxup.num_copies = num_copies
  config.maxup.warmup_epochs = 1.0
  config.lr_warmup_epochs = 0.2
  config.train_eval_examples = 2048
  config.eval_every_epochs = 0.25
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 1
  return config
