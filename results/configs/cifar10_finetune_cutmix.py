"""RESULTS.md experiment 10: the paper's fine-tuning recipe at CIFAR scale (issue 29, part 4).

  --config results/configs/cifar10_finetune_cutmix.py:pretrain         the CutMix-trained baseline
  --config results/configs/cifar10_finetune_cutmix.py:LR,M             fine-tune, BatchNorm training
  --config results/configs/cifar10_finetune_cutmix.py:LR,M,frozen      fine-tune, BatchNorm frozen

  LR = 1e-5 | 1e-4 | 1e-3, M = 1 (CutMix) | 4 (MaxUp+CutMix)

Section 4.1 of the paper fine-tunes ImageNet models that were trained with
CutMix with MaxUp+CutMix (m=4), so that only MaxUp is new: ResNets for 20
epochs at lr 1e-5 with BatchNorm training, EfficientNets for 5 epochs at
lr 1e-4 with BatchNorm frozen (absolute learning rates). Here:

- `pretrain`: experiment 6's regime (`results/configs/cifar10_scratch.py`:
  airbench_32_64_128 on the first 2,500 CIFAR-10 images, 80 epochs, SGD with
  Nesterov momentum 0.9, lr warmed up to 0.1 then cosine, weight decay 5e-4,
  crop + flip) with CutMix (alpha 1) in place of Cutout, m=1. Seeds by
  `--config.seed`; `results/run.sh finetune_cutmix` trains seeds 0-2.
- `LR,M`: fine-tunes of the pretrained model of the same seed
  (`init_checkpoint`; `results/run.sh` passes
  `--config.init_checkpoint=runs/results/cifar10_cutmix_scratch/m1_seedS`,
  so fine-tuning seed S starts from pretrained seed S and the comparison
  paired by seed shares its starting model) on the same 2,500 images for
  20 epochs (the paper's ResNet recipe) at the constant learning rate LR,
  no warm-up, the same SGD and weight decay, crop + flip + CutMix (alpha 1).
  M=4 is MaxUp+CutMix from the first step, M=1 the standard fine-tune; the
  baseline given MaxUp's time is M=1 with `--config.num_epochs` from
  `results/equal_time.py`. The paper's learning rate is 1e-5; 1e-4 and 1e-3
  show where a CIFAR-scale model starts to move.
- `LR,M,frozen`: BatchNorm frozen (scale, bias and statistics), 5 epochs, the
  paper's EfficientNet recipe (its LR is 1e-4).

Every 2 epochs (1 when frozen): test top-1 on all 10,000 test images and
top-1 on the un-augmented training images.
"""

from configs import image_base
from results.configs import cifar10_scratch

LEARNING_RATES = ("1e-5", "1e-4", "1e-3")
NUM_COPIES = (1, 4)
PRETRAINED = "runs/results/cifar10_cutmix_scratch/m1_seed0"


def get_config(arg: str = "1e-5,4"):
  if arg == "pretrain":
    config = cifar10_scratch.get_config("1")
    config.augment.cutout_length = 0
    config.augment.cutmix_alpha = 1.0
    return config
  parts = arg.split(",")
  if len(parts) not in (2, 3) or parts[0] not in LEARNING_RATES or parts[2:] not in ([], ["frozen"]):
    raise ValueError(f"{arg!r}: expected 'pretrain', 'LR,M' or 'LR,M,frozen' with LR in "
                     f"{list(LEARNING_RATES)} and M in {list(NUM_COPIES)}, e.g. 1e-5,4")
  num_copies = image_base.parse_num_copies(parts[1], NUM_COPIES, "the standard CutMix fine-tune")
  frozen = parts[2:] == ["frozen"]
  config = get_config("pretrain")
  config.init_checkpoint = PRETRAINED
  config.freeze_batch_norm = frozen
  config.num_epochs = 5 if frozen else 20
  config.learning_rate = float(parts[0])
  config.lr_schedule = "constant"
  config.lr_warmup_epochs = 0
  config.maxup.warmup_epochs = 0
  config.maxup.num_copies = num_copies
  config.eval_every_epochs = 1 if frozen else 2
  return config
