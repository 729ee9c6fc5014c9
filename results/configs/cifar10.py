"""RESULTS.md experiments 1 and 5: ResNet-8 on 2,048 CIFAR-10 images, Cutout vs MaxUp+Cutout.

  --config results/configs/cifar10.py:M    M = 1 (Cutout) | 2 | 4 | 10 (MaxUp+Cutout)

Everything but the number of copies is shared: 30 epochs of 16 steps (batch
128), SGD momentum 0.9, cosine lr from 0.1, weight decay 5e-4, crop+flip then
Cutout 16. MaxUp starts after 0.75 epochs of standard augmentation: the
paper's 5 of 200 epochs scaled to 30. The small training set makes the model
overfit, so a regulariser has something to fix. Test accuracy is on all
10,000 test images every 5 epochs; the 2,048 training images are also scored
un-augmented (`train_clean`). Seeds by `--config.seed`; the same-wall-clock
baseline is M=1 with `--config.num_epochs` raised (see RESULTS.md).
"""

from configs import image_base

NUM_COPIES = (1, 2, 4, 10)


def get_config(arg: str = "4"):
  num_copies = image_base.parse_num_copies(arg, NUM_COPIES, "Cutout only")
  config = image_base.get_config()
  config.model = "resnet8"
  config.num_train_examples = 2048
  config.train_eval_examples = 2048
  config.batch_size = 128
  config.num_epochs = 30
  config.lr_schedule = "cosine"
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.augment.cutout_length = 16
  config.maxup.num_copies = num_copies
  config.maxup.warmup_epochs = 0.75
  config.eval_every_epochs = 5
  config.log_every_steps = 16
  config.checkpoint_every_steps = 160
  config.keep_checkpoints = 1
  return config
