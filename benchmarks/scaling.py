"""MaxUp's steps on 1, 2 and 4 simulated CPU devices: the work each device does, and its time.

Runs with XLA_FLAGS=--xla_force_host_platform_device_count=4 (set here unless
already set), so one process sees four CPU "devices" that share the same
cores: step times show the cost of the partitioned program, not a speed-up.
For the image step (ResNet-20, CIFAR augmentation) and the language-model step
(the PTB-small LSTM), standard and MaxUp, on every mesh:

  * per-device GFLOPs and temporary memory of the compiled step (XLA's cost
    and memory analysis; deterministic), and the FLOPs' ratio to the ideal,
    one device's figure for the same program / D;
  * the compile time, the median step time, and that the losses match the
    one-device run;
  * that the batch is sharded and the weights replicated.

MaxUp runs its selection two ways: one pass per copy (`copies_per_pass=1`,
the default, a loop over copies whose every pass is split like the standard
step) and all copies in one vmapped pass (`copies_per_pass=m`, which is not
split). XLA counts a loop body once, not per iteration, so GFLOPs of the
looped step are not comparable with the vmapped one; ratios compare each
program with itself on one device.

  python -m benchmarks.scaling
  python -m benchmarks.scaling --tasks image --devices 1,4 --steps 2
"""

from __future__ import annotations

import argparse
import functools
import os
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

from benchmarks import common  # noqa: E402
from trainer import timing  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import ptb_small_lstm  # noqa: E402


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tasks", default="image,language")
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_copies", type=int, default=4, help="MaxUp copies, images")
  parser.add_argument("--lm_num_copies", type=int, default=2, help="MaxUp copies, language")
  parser.add_argument("--steps", type=int, default=4, help="timed steps after the first")
  parser.add_argument("--devices", default="1,2,4")
  return parser.parse_args(argv)


def variants(num_copies):
  """(name, num_copies, copies_per_pass) of the steps compared."""
  return [("standard", 1, 1),
          (f"MaxUp m={num_copies}, one pass per copy", num_copies, 1),
          (f"MaxUp m={num_copies}, one vmapped pass", num_copies, num_copies)]


def compile_step(step_fn, *args):
  """The step compiled ahead of time for these (sharded) arguments."""
  if isinstance(step_fn, functools.partial):  # a jitted step with its static arguments bound
    return step_fn.func.lower(*args, *step_fn.args, **step_fn.keywords).compile()
  return step_fn.lower(*args).compile()


def cost(compiled):
  """(FLOPs, temporary bytes) per device."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return analysis["flops"], compiled.memory_analysis().temp_size_in_bytes


class ImageCase:
  """The image train step as the trainer builds it, on `num_devices` devices."""

  def __init__(self, args, num_devices, num_copies, copies_per_pass):
    config = common.with_maxup(common.benchmark_config(args.model, args.batch_size),
                               num_copies=num_copies, copies_per_pass=copies_per_pass)
    steps = common.image_steps(config, num_devices)
    self.state = steps.init_state()
    self.step_fn = steps.train_steps[num_copies]
    self.batches = [common.random_batch(steps, args.batch_size, seed)
                    for seed in range(args.steps + 1)]
    self.sharded = self.batches[0]["image"]

  def args(self, i):
    return self.state, self.batches[i], jax.random.fold_in(jax.random.key(1), i)

  def run(self, compiled, i):
    self.state, metrics = compiled(*self.args(i))
    return float(metrics["loss"])

  def weights(self):
    return self.state.params


class LanguageCase:
  """The language-model train step as the trainer builds it, on `num_devices` devices."""

  VOCAB_SIZE = 10_000

  def __init__(self, args, num_devices, num_copies, copies_per_pass):
    config = ptb_small_lstm.get_config()
    config.maxup.copies_per_pass = copies_per_pass
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, self.VOCAB_SIZE, (config.batch_size, config.bptt + 1), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    self.runner = common.language_runner(config, self.VOCAB_SIZE, batch, config.bptt,
                                         num_copies, num_devices=num_devices)
    self.step_fn = self.runner.step_fn
    self.sharded = self.runner.inputs[0]["inputs"]
    self.batch_size = config.batch_size

  def args(self, i):
    r = self.runner
    return (r.state, *r.inputs, jax.random.fold_in(r.key, i))

  def run(self, compiled, i):
    r = self.runner
    r.state, metrics = compiled(*self.args(i))
    return float(metrics["loss"])

  def weights(self):
    return self.runner.state.params


def main(args):
  timing.print_environment(model=args.model, batch_size=args.batch_size,
                           num_copies=args.num_copies, lm_num_copies=args.lm_num_copies,
                           steps=args.steps)
  device_counts = [int(n) for n in args.devices.split(",")]
  rows = []
  for task in args.tasks.split(","):
    case_type, num_copies = {"image": (ImageCase, args.num_copies),
                             "language": (LanguageCase, args.lm_num_copies)}[task]
    for name, copies, per_pass in variants(num_copies):
      one_device_flops, reference_losses = None, None
      for num_devices in device_counts:
        case = case_type(args, num_devices, copies, per_pass)
        shards = case.sharded.addressable_shards
        assert len({s.device for s in shards}) == num_devices
        assert shards[0].data.shape[0] == case.sharded.shape[0] // num_devices
        start = time.perf_counter()
        compiled = compile_step(case.step_fn, *case.args(0))
        compile_seconds = time.perf_counter() - start
        flops, temp = cost(compiled)
        if num_devices == 1:
          one_device_flops = flops
        losses = [case.run(compiled, 0)]
        step_times = []
        for i in range(1, args.steps + 1):
          start = time.perf_counter()
          losses.append(case.run(compiled, i))
          step_times.append(time.perf_counter() - start)
        assert jax.tree.leaves(case.weights())[0].sharding.is_fully_replicated
        if reference_losses is None:
          reference_losses = losses
        max_diff = float(np.max(np.abs(np.array(losses) - np.array(reference_losses))))
        ratio = flops / (one_device_flops / num_devices) if one_device_flops else float("nan")
        rows.append([task, name, num_devices, flops / 1e9, f"{ratio:.2f}", temp / 2**20,
                     compile_seconds, 1000 * timing.median(step_times), f"{max_diff:.1e}"])
        print(f"# done: {task}, {name}, {num_devices} devices", flush=True)
  print(f"# image: {args.model}, global batch {args.batch_size}; language: PTB-small "
        f"(2 x 200 LSTM, vocabulary 10k, 32 streams of 35 tokens); two-pass MaxUp; "
        f"loadavg after: {'%.2f %.2f %.2f' % os.getloadavg()}")
  common.print_table(["task", "step", "devices", "GFLOPs per device (XLA count)",
                      "x ideal (1 device / D)", "temporaries MiB per device",
                      "compile s", "step ms (median)",
                      "max |loss - 1-device loss|"], rows)


if __name__ == "__main__":
  main(parse_args())
