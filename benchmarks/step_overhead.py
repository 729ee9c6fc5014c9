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

  python benchmarks/step_overhead.py                                  # ResNet-20, m=1,2,4,10
  python benchmarks/step_overhead.py --model resnet110 --repeats 2 --single_pass_max_copies 4
  python benchmarks/step_overhead.py --copies 1,2,4,10 --repeats 3 --large_batch_baseline
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


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
  steps = common.Steps(args.model, args.batch_size, dtype=args.dtype)
  batch = steps.batch()
  common.print_environment(model=args.model, batch_size=args.batch_size, dtype=args.dtype,
                           repeats=args.repeats)
  runners = {"a": common.StepRunner(steps, steps.train_step(1), batch)}
  for m in copies:
    runners[f"b{m}"] = common.StepRunner(steps, steps.train_step(m, "two_pass"), batch)
    if m <= args.single_pass_max_copies:
      runners[f"c{m}"] = common.StepRunner(steps, steps.train_step(m, "single_pass"), batch)
    runners[f"d{m}"] = common.StepRunner(steps, steps.selection_forward(m), batch,
                                         is_train_step=False)
    if args.large_batch_baseline and m <= args.single_pass_max_copies:
      large = common.Steps(args.model, m * args.batch_size, dtype=args.dtype)
      runners[f"e{m}"] = common.StepRunner(large, large.train_step(1), large.batch())
  times = common.interleaved_medians(runners, args.repeats, warmup=1)
  ms = {name: 1000 * common.median(t) for name, t in times.items()}

  def per_round_median(numerator, denominator):
    return common.median([n / d for n, d in zip(numerator, denominator)])

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
