"""RESULTS.md experiment 7: the paper's fine-tuning recipe on CIFAR-10.

  --config results/configs/cifar10_finetune.py:AUG,M   AUG = cutout | cutmix, M = 1 | 4

Section 4.1 of the paper applies MaxUp to already trained ImageNet models for
a few epochs at a small learning rate. Here the trained model is experiment
6's Cutout baseline, seed 0 (`init_checkpoint`, its workdir under
runs/results; `results/run.sh scratch` rebuilds it), fine-tuned on the same
2,500 images for 10 epochs with SGD (Nesterov momentum 0.9) from lr 0.01, a
tenth of its training peak, cosine to 0, weight decay 5e-4, with crop + flip
and either Cutout 16 or CutMix (alpha 1, the paper's ImageNet
augmentation). M=4 is MaxUp from the first step; M=1 the standard
fine-tune. BatchNorm keeps training, as in the paper's ResNet fine-tunes.
Every 2 epochs: test top-1 on all 10,000 test images and top-1 on the
un-augmented training images. Seeds by `--config.seed`.
"""

from configs import image_base
from results.configs import cifar10_scratch

AUGMENTATIONS = ("cutout", "cutmix")
NUM_COPIES = (1, 4)
PRETRAINED = "runs/results/cifar10_scratch/m1_seed0"


def get_config(arg: str = "cutout,4"):
  augmentation, _, copies = arg.partition(",")
  if augmentation not in AUGMENTATIONS:
    raise ValueError(f"AUG={augmentation!r} in {arg!r}; valid: {list(AUGMENTATIONS)} "
                     "(expected AUG,M, e.g. cutmix,4)")
  num_copies = image_base.parse_num_copies(copies, NUM_COPIES, "the standard fine-tune")
  config = cifar10_scratch.get_config("1")
  config.init_checkpoint = PRETRAINED
  config.num_epochs = 10
  config.learning_rate = 0.01
  config.lr_warmup_epochs = 0
  config.maxup.warmup_epochs = 0
  config.maxup.num_copies = num_copies
  if augmentation == "cutmix":
    config.augment.cutout_length = 0
    config.augment.cutmix_alpha = 1.0
  config.eval_every_epochs = 2
  return config
