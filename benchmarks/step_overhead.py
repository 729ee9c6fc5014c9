"""MaxUp's cost against the ideal: the standard step plus m forward passes.

For each model and m, times in interleaved rounds:

  (a) the standard step (trainer.image.train_step, num_copies=1),
  (b) the MaxUp two-pass step (num_copies=m, mode='two_pass'),
  (c) the MaxUp single-pass step (num_copies=m, mode='single_pass'),
  (d) the selection forward alone: losses of m copies, no gradient,
  (e) with --large_batch_baseline: the standard step at batch m x batch_size,
      the arithmetic of (c) without MaxUp (single-pass vmaps the model over
      the copies, which folds the copy axis into the convolutions' batch).

The ideal MaxUp step costs (a) + (d). Ratios are computed per round (the
variants of a round run back to back, so they see the same machine load)
and their medians reported.

  python -m benchmarks.step_overhead                                  # ResNet-20, m=1,2,4,10
  python -m benchmarks.step_overhead --model resnet110 --repeats 2 --single_pass_max_copies 4
  python -m benchmarks.step_overhead --copies 1,2,4,10 --repeats 3 --large_batch_baseline
"""

from __future__ import annotations

import argparse
import os

from benchmarks import common
from trainer import timing


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--copies", default="1,2,4,10", help="comma-separated values of m")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--single_pass_max_copies", type=int, default=10,
                      help="time single-pass only up to this m (it costs m backward passes)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--large_batch_baseline", action="store_true",
                      help="also time (e), the standard step at batch m x batch_size, for every "
                      "m timed in single-pass")
  return parser.parse_args(argv)


def main(args):
  copies = [int(m) for m in args.copies.split(",")]
  config = common.benchmark_config(args.model, args.batch_size, args.dtype)
  steps = common.image_steps(common.with_maxup(config, num_copies=1))
  batch = common.random_batch(steps, args.batch_size)
  timing.print_environment(model=args.model, batch_size=args.batch_size, dtype=args.dtype,
                           repeats=args.repeats)
  runners = {"a": common.image_runner(steps, steps.train_steps[1], batch)}
  for m in copies:
    two_pass = common.image_steps(common.with_maxup(config, num_copies=m, mode="two_pass"))
    runners[f"b{m}"] = common.image_runner(two_pass, two_pass.train_steps[m], batch)
    if m <= args.single_pass_max_copies:
      single_pass = common.image_steps(common.with_maxup(config, num_copies=m,
                                                         mode="single_pass"))
      runners[f"c{m}"] = common.image_runner(single_pass, single_pass.train_steps[m], batch)
    runners[f"d{m}"] = common.image_runner(steps, common.selection_forward(config, steps, m),
                                           batch, updates_state=False)
    if args.large_batch_baseline and m <= args.single_pass_max_copies:
      large_config = common.benchmark_config(args.model, m * args.batch_size, args.dtype)
      large = common.image_steps(common.with_maxup(large_config, num_copies=1))
      runners[f"e{m}"] = common.image_runner(
          large, large.train_steps[1], common.random_batch(large, m * args.batch_size))
  times = timing.interleaved_medians(runners, args.repeats, warmup=1)
  ms = {name: 1000 * timing.median(t) for name, t in times.items()}

  def per_round_median(numerator, denominator):
    return timing.median([n / d for n, d in zip(numerator, denominator)])

  rows = []
  a = times["a"]
  for m in copies:
    b, d = times[f"b{m}"], times[f"d{m}"]
    ideal = [x + y for x, y in zip(a, d)]
    c, e = times.get(f"c{m}"), times.get(f"e{m}")
    rows.append([
        m, ms["a"], ms[f"b{m}"], ms[f"c{m}"] if c else "-", ms[f"d{m}"],
        per_round_median(b, a), per_round_median(c, a) if c else "-",
        per_round_median(b, ideal),
        "yes" if per_round_median(b, ideal) <= 1.10 else "no",
    ])
    if args.large_batch_baseline:
      rows[-1] += [ms[f"e{m}"] if e else "-", per_round_median(c, e) if c and e else "-"]
  print(f"# {args.model}, batch {args.batch_size}, {args.dtype}: medians of {args.repeats} "
        f"interleaved rounds; loadavg after: {'%.2f %.2f %.2f' % os.getloadavg()}")
  header = ["m", "(a) standard ms", "(b) two-pass ms", "(c) single-pass ms", "(d) selection ms",
            "(b)/(a)", "(c)/(a)", "(b)/((a)+(d))", "within 10% of ideal"]
  if args.large_batch_baseline:
    header += ["(e) standard at batch m x B ms", "(c)/(e)"]
  common.print_table(header, rows)


if __name__ == "__main__":
  main(parse_args())
