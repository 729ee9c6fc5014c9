"""RESULTS.md experiment 6: CIFAR-10 from scratch until the baseline fits its training set.

  --config results/configs/cifar10_scratch.py:M   M = 1 (Cutout) | 2 | 4 | 10 (MaxUp+Cutout)

MaxUp is a regulariser, so this experiment trains where there is something
to regularise: the baseline ends at >= 95% top-1 on its (un-augmented)
training images, well above its test accuracy. The model is a narrow
airbench network (widths 32/64/128, 295k parameters), which on a 2-core CPU
trains 2.5x as many images per second as ResNet-20 at the same parameter
count, on the first 2,500 CIFAR-10 training images, scored on all 10,000
test images. (On 5,000 images for 40 epochs, about the same number of
steps, the baseline fitted only 91.9% of them: 77.2% test top-1.)
Everything but M is shared: 80 epochs of batch 128 (19 steps each, 1,520 in
all), SGD with Nesterov momentum 0.9, lr linearly warmed up over 1 epoch to
0.1 then cosine to 0, weight decay 5e-4, crop + flip then Cutout 16; MaxUp
starts after 2 epochs of standard augmentation (the paper's 5 of 200). Every
10 epochs the 2,500 training images are also scored un-augmented
(`train_clean`). Seeds by `--config.seed`; the same-time baseline is M=1
with `--config.num_epochs` from `results/equal_time.py`.
"""

from configs import image_base

NUM_COPIES = (1, 2, 4, 10)


def get_config(arg: str = "4"):
  num_copies = image_base.parse_num_copies(arg, NUM_COPIES, "Cutout only")
  config = image_base.get_config()
  config.model = "airbench_32_64_128"
  config.num_train_examples = 2500
  config.train_eval_examples = 2500
  config.batch_size = 128
  config.num_epochs = 80
  config.lr_schedule = "cosine"
  config.learning_rate = 0.1
  config.lr_warmup_epochs = 1
  config.nesterov = True
  config.weight_decay = 5e-4
  config.augment.cutout_length = 16
  config.maxup.num_copies = num_copies
  config.maxup.warmup_epochs = 2
  config.eval_every_epochs = 10
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  return config
