"""Our training steps against a faithful PyTorch reference, timed in the same process.

The PyTorch side is the same algorithm written the way a PyTorch user would:
the same CIFAR ResNet (projection shortcuts, BatchNorm momentum 0.1 and
epsilon 1e-5), the same batched augmentation (pad 4 + random crop + flip,
normalise, Cutout 16), SGD with momentum and weight decay, and for MaxUp m
forward passes under `torch.no_grad()`, the per-example argmax over the copies
and one forward/backward on the winners. Both frameworks use the same number
of threads (all cores by default) and are called in turn in every round.

  python -m benchmarks.vs_pytorch                         # ResNet-20, batch 128, m=4
  python -m benchmarks.vs_pytorch --model resnet110 --repeats 3
  python -m benchmarks.vs_pytorch --xla_flags=--xla_cpu_use_onednn=true

Needs PyTorch (the `bench` extra): pip install torch.
"""

from __future__ import annotations

import argparse
import os


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet20", help="resnet20, resnet110, ... (CIFAR ResNet)")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_copies", type=int, default=4, help="m of the MaxUp step")
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians are reported)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="intra-op threads of both frameworks")
  parser.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for this run")
  parser.add_argument("--torch_channels_last", action="store_true",
                      help="also time PyTorch with channels_last (NHWC) memory format")
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.xla_flags:
  # XLA reads its flags once, when the backend starts: set them before importing jax.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

from benchmarks import common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer import image_data, timing  # noqa: E402

MEAN, STD = image_data.DATASET_STATS["cifar10"]


# ---------------------------------------------------------------------------
# The PyTorch reference.


class BasicBlock(nn.Module):
  """conv-BN-ReLU-conv-BN + (1x1 conv + BN when the shape changes), ReLU."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                    nn.BatchNorm2d(planes))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
  """The CIFAR ResNet of depth 6n+2 (He et al., 2016), as maxup_jax.models.CifarResNet."""

  def __init__(self, depth, num_classes=10):
    super().__init__()
    n = (depth - 2) // 6
    self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    layers, in_planes = [], 16
    for stage, planes in enumerate((16, 32, 64)):
      for block in range(n):
        layers.append(BasicBlock(in_planes, planes, 2 if stage > 0 and block == 0 else 1))
        in_planes = planes
    self.layers = nn.Sequential(*layers)
    self.classifier = nn.Linear(64, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.layers(self.stem(x))
    return self.classifier(x.mean(dim=(2, 3)))


def torch_augment(images_uint8, generator, padding=4, cutout_length=16):
  """Batched crop + flip (black padding), normalisation and Cutout, on NCHW uint8 images."""
  batch_size, channels, height, width = images_uint8.shape
  x = images_uint8.float().div_(255.0)
  padded = F.pad(x, (padding,) * 4)
  dy = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
  dx = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
  flip = torch.rand(batch_size, generator=generator) < 0.5
  rows = dy[:, None] + torch.arange(height)[None]
  cols = dx[:, None] + torch.arange(width)[None]
  cols = torch.where(flip[:, None], cols.flip(1), cols)
  batch_index = torch.arange(batch_size)[:, None, None]
  crops = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
  x = crops.permute(0, 3, 1, 2)
  mean = torch.tensor(MEAN).view(1, -1, 1, 1)
  std = torch.tensor(STD).view(1, -1, 1, 1)
  x = (x - mean) / std
  cy = torch.randint(0, height, (batch_size,), generator=generator)
  cx = torch.randint(0, width, (batch_size,), generator=generator)
  half = cutout_length // 2
  ys = torch.arange(height)[None]
  xs = torch.arange(width)[None]
  in_rows = (ys >= (cy[:, None] - half)) & (ys < (cy[:, None] + half))
  in_cols = (xs >= (cx[:, None] - half)) & (xs < (cx[:, None] + half))
  hole = in_rows[:, :, None] & in_cols[:, None, :]
  return x.masked_fill(hole[:, None], 0.0).contiguous()


class TorchTrainer:
  """Standard and MaxUp SGD steps in PyTorch, the way its users would write them."""

  def __init__(self, depth, images, labels, channels_last=False, seed=0):
    torch.manual_seed(seed)
    self.model = CifarResNet(depth)
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = self.model.to(memory_format=self.memory_format)
    self.model.train()
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9,
                                     weight_decay=5e-4)
    self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    self.labels = torch.from_numpy(labels.astype(np.int64))
    self.generator = torch.Generator().manual_seed(seed)

  def _augment(self):
    x = torch_augment(self.images, self.generator)
    return x.contiguous(memory_format=self.memory_format)

  def _update(self, inputs):
    self.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(self.model(inputs), self.labels)
    loss.backward()
    self.optimizer.step()
    return loss

  def standard_step(self):
    return self._update(self._augment()).item()

  def maxup_step(self, num_copies):
    copies, copy_losses = [], []
    with torch.no_grad():
      for _ in range(num_copies):
        x = self._augment()
        copies.append(x)
        copy_losses.append(F.cross_entropy(self.model(x), self.labels, reduction="none"))
    worst = torch.stack(copy_losses).argmax(dim=0)
    copies = torch.stack(copies)
    winners = copies[worst, torch.arange(copies.shape[1])]
    return self._update(winners).item()


# ---------------------------------------------------------------------------


def main(args):
  torch.set_num_threads(args.threads)
  depth = int(args.model.removeprefix("resnet"))
  config = common.with_maxup(common.benchmark_config(args.model, args.batch_size),
                             num_copies=args.num_copies)
  steps = common.image_steps(config)
  batch = common.random_batch(steps, args.batch_size)
  host_images = np.asarray(batch["image"])
  host_labels = np.asarray(batch["label"])

  runners = {
      "jax standard": common.image_runner(steps, steps.train_steps[1], batch),
      f"jax maxup m={args.num_copies}": common.image_runner(
          steps, steps.train_steps[args.num_copies], batch),
  }
  torch_trainer = TorchTrainer(depth, host_images, host_labels)
  runners["torch standard"] = torch_trainer.standard_step
  runners[f"torch maxup m={args.num_copies}"] = lambda: torch_trainer.maxup_step(args.num_copies)
  if args.torch_channels_last:
    nhwc = TorchTrainer(depth, host_images, host_labels, channels_last=True)
    runners["torch channels_last standard"] = nhwc.standard_step
    runners[f"torch channels_last maxup m={args.num_copies}"] = (
        lambda: nhwc.maxup_step(args.num_copies))

  timing.print_environment(torch=torch.__version__, threads=args.threads,
                           torch_threads=torch.get_num_threads(), model=args.model,
                           batch_size=args.batch_size, repeats=args.repeats)
  times = timing.interleaved_medians(runners, args.repeats, warmup=2)
  medians = {name: timing.median(t) for name, t in times.items()}
  best = {name: min(t) for name, t in times.items()}
  rows = []
  for kind in ("standard", f"maxup m={args.num_copies}"):
    ours, theirs = f"jax {kind}", f"torch {kind}"
    row = [kind, args.batch_size / medians[ours], args.batch_size / medians[theirs],
           medians[theirs] / medians[ours], args.batch_size / best[ours],
           args.batch_size / best[theirs], best[theirs] / best[ours]]
    if args.torch_channels_last:
      row.append(args.batch_size / medians[f"torch channels_last {kind}"])
      row.append(args.batch_size / best[f"torch channels_last {kind}"])
    rows.append(row)
  header = ["step", "JAX images/s", "PyTorch images/s", "JAX / PyTorch",
            "JAX images/s (best round)", "PyTorch images/s (best round)",
            "JAX / PyTorch (best rounds)"]
  if args.torch_channels_last:
    header += ["PyTorch channels_last images/s", "(best round)"]
  print(f"# {args.model}, batch {args.batch_size}: medians and best of {args.repeats} "
        f"interleaved rounds; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"loadavg after: {'%.2f %.2f %.2f' % os.getloadavg()}")
  common.print_table(header, rows)
  return medians


if __name__ == "__main__":
  main(ARGS)
