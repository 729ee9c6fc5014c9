"""The paper's CIFAR experiments (tables 3-5): `--config configs/cifar_paper.py:DATASET,MODEL,METHOD`.

  DATASET: cifar10 | cifar100
  MODEL:   resnet110 | preact_resnet110 | wrn28_10
  METHOD:  cutout (m=1) | maxup (MaxUp+Cutout: m=4 for the ResNets, m=10 for WRN)

All: 200 epochs, batch 256, SGD momentum 0.9, weight decay 2.5e-4, no dropout,
crop+flip then Cutout (length 16 on CIFAR-10, 8 on CIFAR-100), 5 epochs of
standard augmentation before MaxUp. lr 0.1, divided by 10 after epochs 100
and 150 (ResNets) or after 60, 120 and 180 (WRN, as Zagoruyko & Komodakis).
"""

from configs import image_base

DATASETS = ("cifar10", "cifar100")
MODELS = ("resnet110", "preact_resnet110", "wrn28_10")
METHODS = ("cutout", "maxup")


def get_config(arg: str = "cifar10,resnet110,maxup"):
  parts = arg.split(",")
  if len(parts) != 3:
    raise ValueError(f"config argument {arg!r}; expected DATASET,MODEL,METHOD")
  dataset, model, method = parts
  for value, valid, what in ((dataset, DATASETS, "DATASET"), (model, MODELS, "MODEL"),
                             (method, METHODS, "METHOD")):
    if value not in valid:
      raise ValueError(f"{what}={value!r} in {arg!r}; valid: {list(valid)}")

  config = image_base.get_config()
  config.dataset = dataset
  config.model = model
  config.augment.cutout_length = 16 if dataset == "cifar10" else 8
  if model == "wrn28_10":
    config.lr_decay_epochs = (60, 120, 180)
  config.maxup.num_copies = 1 if method == "cutout" else (10 if model == "wrn28_10" else 4)
  return config
