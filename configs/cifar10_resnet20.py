"""ResNet-20 on CIFAR-10 with MaxUp+Cutout, sized for a laptop CPU.

A few minutes on two cores: 10,000 training images, 4 epochs, one of them
with standard augmentation before MaxUp (m=4) starts. Test accuracy is on the
full 10,000-image test set.
"""

from configs import image_base


def get_config():
  config = image_base.get_config()
  config.model = "resnet20"
  config.num_train_examples = 10_000
  config.batch_size = 128
  config.num_epochs = 4
  config.lr_schedule = "cosine"
  config.weight_decay = 5e-4
  config.maxup.warmup_epochs = 1
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  return config
