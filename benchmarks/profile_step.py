"""Where a training step's time goes: XLA:CPU op time by kind, from a jax.profiler trace.

  python -m benchmarks.profile_step                       # ResNet-20 standard step, batch 128
  python -m benchmarks.profile_step --num_copies 4        # the MaxUp two-pass step
  python -m benchmarks.profile_step --model airbench_32_64_128 --top 20

Traces `--steps` calls of the step after warm-up (`jax.profiler.trace` with a
Perfetto trace), sums the durations of the trace's complete events by kind
(the event name without its `.N` instance suffix, e.g. every `ynn_fusion.*`
together), and prints ms per step, share of the summed op time and events
per step. Python-side and runtime events (names with `::`, `PjitFunction`,
`$`) are left out, so the shares are of XLA's own work. Nested events would
be counted twice; XLA:CPU's thunks do not nest.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from benchmarks import common
from trainer import timing

_NOT_XLA_OPS = re.compile(r"::|PjitFunction|^\$|\.py|^ThunkExecutor|^Thunk$")


def op_kind(name: str) -> str:
  """`ynn_fusion.12` -> `ynn_fusion`; `loop_add_fusion.3` -> `loop_add_fusion`."""
  return re.sub(r"(\.\d+)+$", "", name)


def op_times(trace_events: list[dict]) -> dict[str, tuple[float, int]]:
  """Summed duration (us) and count of the complete events of every op kind."""
  totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for event in trace_events:
    if event.get("ph") != "X" or "dur" not in event:
      continue
    name = event.get("name", "")
    if not name or _NOT_XLA_OPS.search(name):
      continue
    entry = totals[op_kind(name)]
    entry[0] += float(event["dur"])
    entry[1] += 1
  return {kind: (total, count) for kind, (total, count) in totals.items()}


def read_trace(log_dir: str) -> list[dict]:
  paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
  paths += glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no trace file under {log_dir}")
  with gzip.open(sorted(paths)[-1], "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_copies", type=int, default=1, help="1: the standard step")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=12, help="rows before 'everything else'")
  args = parser.parse_args(argv)

  config = common.with_maxup(common.benchmark_config(args.model, args.batch_size),
                             num_copies=args.num_copies)
  steps = common.image_steps(config)
  runner = common.image_runner(steps, steps.train_steps[args.num_copies],
                               common.random_batch(steps, args.batch_size))
  for _ in range(2):
    runner()
  timing.print_environment(model=args.model, batch_size=args.batch_size,
                           num_copies=args.num_copies, steps=args.steps)
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        runner()
    times = op_times(read_trace(log_dir))

  total = sum(t for t, _ in times.values())
  ranked = sorted(times.items(), key=lambda item: -item[1][0])
  rows = [[kind, t / 1000 / args.steps, f"{100 * t / total:.0f}%", count / args.steps]
          for kind, (t, count) in ranked[:args.top]]
  rest = ranked[args.top:]
  if rest:
    rest_time = sum(t for _, (t, _) in rest)
    rows.append([f"everything else ({len(rest)} kinds)", rest_time / 1000 / args.steps,
                 f"{100 * rest_time / total:.0f}%", sum(c for _, (_, c) in rest) / args.steps])
  print(f"# summed op time {total / 1000 / args.steps:.0f} ms per step")
  common.print_table(["op kind", "ms per step", "share", "events per step"], rows)


if __name__ == "__main__":
  main()
