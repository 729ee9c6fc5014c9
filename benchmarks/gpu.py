"""The prepared GPU benchmark: overhead against the ideal, and peak memory, fp32 and bf16.

For ResNet-110 and WRN-28-10 at batch 128, in float32 and bfloat16
computation (parameters stay float32), times in interleaved rounds the
standard step (a), the MaxUp two-pass step (b) and the selection forward (d)
for every m, and reports images/s, (b)/(a), (b)/((a)+(d)) and memory:

  compiled peak   XLA's memory analysis of the step (temp + arguments +
                  outputs - donated), per step;
  device peak     the allocator's `peak_bytes_in_use` (device.memory_stats()),
                  a running maximum over the process: read after each
                  variant's first call, variants in increasing order of size.

Sized to stay within about 5 minutes on one H100 (2 models x 2 dtypes x
(1 + 2 x len(copies)) compilations dominate); not yet run on a GPU.

  python benchmarks/gpu.py
  python benchmarks/gpu.py --models resnet110 --dtypes bfloat16 --copies 4
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402

MIB = 2**20


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="resnet110,wrn28_10")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--copies", default="4,10",
                      help="values of m (each costs two more compilations per model and dtype)")
  parser.add_argument("--repeats", type=int, default=10)
  return parser.parse_args(argv)


def compile_with_peak(jitted, *args):
  """Compiles once, ahead of time; returns the executable and XLA's planned peak in MiB."""
  compiled = jitted.lower(*args).compile()
  analysis = compiled.memory_analysis()
  peak = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes +
          analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  return compiled, peak / MIB


def device_peak_mib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", 0) / MIB


def main(args):
  copies = [int(m) for m in args.copies.split(",")]
  device = jax.devices()[0]
  common.print_environment(card=device.device_kind, batch_size=args.batch_size,
                           repeats=args.repeats)
  rows = []
  for model_name in args.models.split(","):
    for dtype in args.dtypes.split(","):
      steps = common.Steps(model_name, args.batch_size, dtype=dtype)
      batch = steps.batch()
      key = jax.random.key(0)
      abstract_state = jax.eval_shape(steps.initial_state)
      runners, compiled, device_peak = {}, {}, {}
      variants = [("a", steps.train_step(1), True)]
      for m in copies:
        variants += [(f"d{m}", steps.selection_forward(m), False),
                     (f"b{m}", steps.train_step(m), True)]
      for name, fn, is_train_step in variants:
        executable, compiled[name] = compile_with_peak(fn, abstract_state, batch, key)
        runners[name] = common.StepRunner(steps, executable, batch, is_train_step)
        runners[name]()
        device_peak[name] = device_peak_mib()
      times = common.interleaved_medians(runners, args.repeats, warmup=2)
      a = times["a"]
      for m in copies:
        b, d = times[f"b{m}"], times[f"d{m}"]
        rows.append([
            model_name, dtype, m, args.batch_size / common.median(a),
            args.batch_size / common.median(b),
            common.median([x / y for x, y in zip(b, a)]),
            common.median([x / (y + z) for x, y, z in zip(b, a, d)]),
            compiled["a"], compiled[f"b{m}"], compiled[f"b{m}"] / compiled["a"],
            device_peak[f"b{m}"],
        ])
      del runners
      print(f"# done: {model_name} {dtype}", flush=True)
  print(f"# {device.device_kind}, batch {args.batch_size}; medians of {args.repeats} "
        "interleaved rounds; memory in MiB")
  common.print_table(
      ["model", "dtype", "m", "standard images/s", "MaxUp images/s", "(b)/(a)",
       "(b)/((a)+(d))", "standard compiled peak", "MaxUp compiled peak", "peak ratio",
       "device peak so far"], rows)


if __name__ == "__main__":
  main(parse_args())
