"""The prepared GPU benchmark: overhead against the ideal, and peak memory, fp32 and bf16.

For ResNet-110 and WRN-28-10 at batch 128, in float32 and bfloat16
computation (parameters stay float32), times in interleaved rounds the
standard step (a), the MaxUp two-pass step (b) and the selection forward (d)
for every m, and reports images/s, (b)/(a), (b)/((a)+(d)) and memory:

  compiled peak   XLA's memory analysis of the step (temp + arguments +
                  outputs - donated), per step;
  device peak     the allocator's `peak_bytes_in_use` (device.memory_stats()),
                  a running maximum over the process, read after each
                  variant's first call: it bounds the variants measured so
                  far, in the order they ran.

Built for a short slot on one H100/H200, as one command. The work is split
into units, one per (model, dtype, m), run most important first:

  m=4:  resnet110 float32, wrn28_10 float32, resnet110 bfloat16, wrn28_10 bfloat16
  m=10: the same order

A unit compiles what it lacks (the standard step once per model and dtype,
then the selection forward and the MaxUp step of its m, in parallel threads)
and times (a), (d), (b) in interleaved rounds. Before each unit after the
first, its cost is estimated from the compilations and steps measured so far;
a unit that would end past `--time_budget_s` is skipped, and the skip is
printed and saved. Every row is printed (flushed) as soon as it is measured
and appended to `--out` (JSON lines) and to the Markdown table beside it
(`--out` with `.md`), so a killed run still leaves its figures; a watchdog
ends the process `--grace_s` after the budget whatever it is doing.

Time of the default run (not yet measured on a GPU): 2 models x 2 dtypes x
(1 + 2 x 2) = 20 compilations. Assuming 15-40 s per compilation of these
steps on XLA:GPU (autotuning included), that is 300-800 s sequentially and
about a third of that with the default 3 compilation threads; the timing
itself is small beside it (3 variants x (2 + 7) calls of at most a few
hundred ms each, about 5-15 s per unit). Expected: 3-6 minutes; bounded by
the 420 s budget plus 40 s grace, i.e. under 8 minutes after the interpreter
starts, whatever compilation costs. The m=10 units, which need no new
standard step, are the ones the budget drops first.

  python -m benchmarks.gpu --out /tmp/gpu.jsonl        # the default run, < 8 minutes
  python -m benchmarks.gpu --models resnet110 --dtypes bfloat16 --copies 4
  python -m benchmarks.gpu --dry_run                   # CPU smoke run: small_cnn, batch 8, m=2
  python -m benchmarks.gpu --dry_run --models resnet8  # the same with BatchNorm (a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp

from benchmarks import common
from trainer import timing

MIB = 2**20

# Values of the options left unset, for the GPU run and for the CPU smoke run.
GPU_DEFAULTS = dict(models="resnet110,wrn28_10", dtypes="float32,bfloat16", batch_size=128,
                    copies="4,10", repeats=7, warmup=1, time_budget_s=420.0, grace_s=40.0)
DRY_RUN_DEFAULTS = dict(models="small_cnn", dtypes="float32", batch_size=8, copies="2",
                        repeats=2, warmup=0, time_budget_s=120.0, grace_s=60.0)

TABLE_HEADER = ["model", "dtype", "m", "standard images/s", "MaxUp images/s", "(b)/(a)",
                "(b)/((a)+(d))", "standard compiled peak", "MaxUp compiled peak", "peak ratio",
                "device peak so far"]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", help=f"comma-separated (default {GPU_DEFAULTS['models']})")
  parser.add_argument("--dtypes", help=f"comma-separated (default {GPU_DEFAULTS['dtypes']})")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--copies", help="values of m (each costs two more compilations per "
                      f"model and dtype; default {GPU_DEFAULTS['copies']})")
  parser.add_argument("--repeats", type=int, help="timed interleaved rounds per unit")
  parser.add_argument("--warmup", type=int,
                      help="untimed calls of each variant after its first (compiling) call")
  parser.add_argument("--time_budget_s", type=float,
                      help="start no unit expected to end later than this, in seconds "
                      "from the start of main (default 420)")
  parser.add_argument("--grace_s", type=float,
                      help="end the process this long after the budget, whatever it is doing")
  parser.add_argument("--compile_threads", type=int, default=3,
                      help="compile a unit's missing executables in this many threads")
  parser.add_argument("--out", default="gpu_results.jsonl",
                      help="JSON-lines file the results are appended to as they come; the "
                      "Markdown table is written beside it with the suffix .md")
  parser.add_argument("--dry_run", action="store_true",
                      help="CPU smoke run of the whole script: small_cnn, batch 8, m=2, float32 (add "
                      "--models resnet8 for one with BatchNorm)")
  args = parser.parse_args(argv)
  defaults = DRY_RUN_DEFAULTS if args.dry_run else GPU_DEFAULTS
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


@dataclasses.dataclass(frozen=True)
class Unit:
  """One table row: model, dtype and m; needs (a) of its model and dtype, (d) and (b) of its m."""
  model: str
  dtype: str
  m: int

  @property
  def label(self) -> str:
    return f"{self.model} {self.dtype} m={self.m}"


def work_units(models: list[str], dtypes: list[str], copies: list[int]) -> list[Unit]:
  """The units, most important first: by m, then dtype, then model, each in the order given.

  The smallest m of every model and dtype comes before any larger m, so a
  budget that runs out drops the large m first, and those cost the least to
  drop: they add no standard-step compilation.
  """
  return [Unit(model, dtype, m) for m in copies for dtype in dtypes for model in models]


@dataclasses.dataclass
class Measured:
  """What has been measured so far, the basis of the cost estimates.

  compile_s: seconds per compilation, keyed by (model, dtype, variant) with
    variant 'a', 'd<m>' or 'b<m>'.
  step_s: median seconds per call, same keys.
  """
  compile_s: dict[tuple[str, str, str], float] = dataclasses.field(default_factory=dict)
  step_s: dict[tuple[str, str, str], float] = dataclasses.field(default_factory=dict)


def variants_of(unit: Unit) -> list[str]:
  return ["a", f"d{unit.m}", f"b{unit.m}"]


def estimate_compile_s(measured: Measured, unit: Unit, variant: str) -> float:
  """Seconds to compile `variant` of `unit`: the slowest comparable compilation so far.

  Comparable, from the closest to the loosest: the same model and kind of
  step ('a', 'd' or 'b') in any dtype and m; the same model; any model. The
  MaxUp step of a larger m has the same operations on larger arrays, so its
  compilation costs about the same.
  """
  kind = variant[0]
  for matches in (lambda k: k[0] == unit.model and k[2][0] == kind,
                  lambda k: k[0] == unit.model,
                  lambda k: True):
    times = [t for k, t in measured.compile_s.items() if matches(k)]
    if times:
      return max(times)
  return 0.0


def estimate_step_s(measured: Measured, unit: Unit, variant: str) -> float:
  """Seconds per call of `variant`, scaled from the standard step of the same model.

  With t_a the standard step (forward + backward, about 3 forwards), the
  selection forward of m copies costs about m t_a / 3 and the MaxUp step
  t_a (1 + m / 3); a measured value wins, and a missing t_a is taken from the
  other dtype of the model (0 if the model has not run: then compilation,
  which dominates, is the whole estimate).
  """
  key = (unit.model, unit.dtype, variant)
  if key in measured.step_s:
    return measured.step_s[key]
  standard = [t for (model, dtype, v), t in measured.step_s.items()
              if model == unit.model and v == "a"]
  t_a = measured.step_s.get((unit.model, unit.dtype, "a"), max(standard, default=0.0))
  if variant == "a":
    return t_a
  if variant.startswith("d"):
    return t_a * unit.m / 3
  return t_a * (1 + unit.m / 3)


def estimate_unit_s(measured: Measured, unit: Unit, compiled: set, warmup: int, repeats: int,
                    compile_threads: int) -> float:
  """Seconds the unit will take: its missing compilations (in parallel) and its timed calls."""
  missing = [v for v in variants_of(unit) if (unit.model, unit.dtype, v) not in compiled]
  compile_times = sorted((estimate_compile_s(measured, unit, v) for v in missing), reverse=True)
  # Threads take the compilations in turn; the longest chain bounds the wall time.
  compile_wall = sum(compile_times[::max(1, compile_threads)])
  calls = 1 + warmup + repeats
  run = calls * sum(estimate_step_s(measured, unit, v) for v in variants_of(unit))
  return compile_wall + run


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


class ResultsFile:
  """Appends one JSON object per line to `path`, flushed and synced, and keeps the .md table."""

  def __init__(self, path: str):
    self.path = path
    self.table_path = os.path.splitext(path)[0] + ".md"
    self.rows: list[list[Any]] = []
    self.header_lines: list[str] = []
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    open(path, "w").close()

  def write(self, record: dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def add_row(self, row: list[Any]) -> None:
    self.rows.append(row)
    self.write({"kind": "row", **dict(zip(TABLE_HEADER, row))})
    lines = self.header_lines + [markdown_row(TABLE_HEADER), markdown_separator(TABLE_HEADER)]
    lines += [markdown_row(r) for r in self.rows]
    with open(self.table_path, "w") as f:
      f.write("\n".join(lines) + "\n")


def fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
  return str(value)


def markdown_row(values) -> str:
  return "| " + " | ".join(fmt(v) for v in values) + " |"


def markdown_separator(header) -> str:
  return "|" + "|".join("---" for _ in header) + "|"


def say(line: str) -> None:
  print(line, flush=True)


def start_watchdog(deadline_s: float, results: ResultsFile) -> threading.Timer:
  """Ends the process at `deadline_s`, even inside a compilation (results are already saved)."""

  def stop():
    say(f"# watchdog: {deadline_s:.0f} s reached, exiting; results so far are in {results.path}")
    try:
      results.write({"kind": "watchdog", "deadline_s": deadline_s})
    finally:
      sys.stdout.flush()
      os._exit(3)

  timer = threading.Timer(deadline_s, stop)
  timer.daemon = True
  timer.start()
  return timer


class ModelDtype:
  """The steps, batch and compiled runners of one model and dtype, kept across its units."""

  def __init__(self, model: str, dtype: str, batch_size: int):
    self.config = common.with_maxup(common.benchmark_config(model, batch_size, dtype),
                                    num_copies=1)
    self.steps = common.image_steps(self.config)
    self.batch = common.random_batch(self.steps, batch_size)
    # `init_state` compiles the initialiser again on every call; each runner
    # donates its state, so each needs its own buffers: copies of one state.
    self.initial_state = self.steps.init_state()
    self.key = jax.random.key(0)
    self.runners: dict[str, timing.StepRunner] = {}
    self.compiled_peak: dict[str, float] = {}
    self.device_peak: dict[str, float] = {}

  def jitted(self, variant: str) -> tuple[Callable, bool]:
    """The jitted function of a variant and whether it is a train step."""
    if variant == "a":
      return self.steps.train_steps[1], True
    m = int(variant[1:])
    if variant.startswith("d"):
      return common.selection_forward(self.config, self.steps, m), False
    maxup = common.image_steps(common.with_maxup(self.config, num_copies=m))
    return maxup.train_steps[m], True

  def compile(self, variants: list[str], threads: int) -> dict[str, float]:
    """Compiles the variants not yet compiled, in parallel; returns seconds per compilation."""
    missing = [v for v in variants if v not in self.runners]
    jitted = {v: self.jitted(v) for v in missing}

    def compile_one(fn):
      start = time.perf_counter()
      executable, peak = compile_with_peak(fn, self.steps.abstract_state, self.batch, self.key)
      return executable, peak, time.perf_counter() - start

    seconds = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
      futures = {v: pool.submit(compile_one, jitted[v][0]) for v in missing}
      for variant in missing:
        executable, self.compiled_peak[variant], seconds[variant] = futures[variant].result()
        is_train_step = jitted[variant][1]
        self.runners[variant] = timing.StepRunner(
            executable, jax.tree.map(jnp.copy, self.initial_state), (self.batch,),
            jax.random.key(1), updates_state=is_train_step)
    # First calls one at a time, so that the running device peak follows each.
    for variant in missing:
      self.runners[variant]()
      self.device_peak[variant] = device_peak_mib()
    return seconds

  def release(self, variants: list[str]) -> None:
    for variant in variants:
      self.runners.pop(variant, None)


def measure_unit(unit: Unit, held: ModelDtype, args, measured: Measured,
                 results: ResultsFile) -> list[Any]:
  """Compiles and times one unit; records what it measured; returns its table row."""
  variants = variants_of(unit)
  seconds = held.compile(variants, args.compile_threads)
  for variant, s in seconds.items():
    measured.compile_s[(unit.model, unit.dtype, variant)] = s
    say(f"# compiled: {unit.model} {unit.dtype} {variant}: {s:.1f} s")
    results.write({"kind": "compile_s", "model": unit.model, "dtype": unit.dtype,
                   "variant": variant, "seconds": s})
  times = timing.interleaved_medians({v: held.runners[v] for v in variants}, args.repeats,
                                     warmup=args.warmup)
  for variant in variants:
    measured.step_s[(unit.model, unit.dtype, variant)] = timing.median(times[variant])
  a, d, b = (times[v] for v in variants)
  batch_size = args.batch_size
  return [
      unit.model, unit.dtype, unit.m, batch_size / timing.median(a),
      batch_size / timing.median(b),
      timing.median([x / y for x, y in zip(b, a)]),
      timing.median([x / (y + z) for x, y, z in zip(b, a, d)]),
      held.compiled_peak["a"], held.compiled_peak[variants[2]],
      held.compiled_peak[variants[2]] / held.compiled_peak["a"], held.device_peak[variants[2]],
  ]


def main(args):
  start = time.perf_counter()
  elapsed = lambda: time.perf_counter() - start  # noqa: E731
  results = ResultsFile(args.out)
  start_watchdog(args.time_budget_s + args.grace_s, results)
  copies = [int(m) for m in args.copies.split(",")]
  units = work_units(args.models.split(","), args.dtypes.split(","), copies)
  device = jax.devices()[0]
  if args.dry_run:
    say("# dry run: a CPU smoke test of the script, not a benchmark")
  environment = timing.environment(card=device.device_kind, batch_size=args.batch_size,
                                   repeats=args.repeats, warmup=args.warmup,
                                   time_budget_s=args.time_budget_s, dry_run=args.dry_run)
  for key, value in environment.items():
    say(f"# {key}: {value}")
  results.write({"kind": "environment", **environment})
  results.header_lines = [f"<!-- {key}: {value} -->" for key, value in environment.items()]
  say(f"# {len(units)} units, most important first: " + ", ".join(u.label for u in units))
  say(f"# {device.device_kind}, batch {args.batch_size}; medians of {args.repeats} interleaved "
      "rounds; memory in MiB; rows as measured:")
  say(markdown_row(TABLE_HEADER))
  say(markdown_separator(TABLE_HEADER))

  measured = Measured()
  held: dict[tuple[str, str], ModelDtype] = {}
  compiled: set = set()
  skipped = []
  for index, unit in enumerate(units):
    estimate = estimate_unit_s(measured, unit, compiled, args.warmup, args.repeats,
                               args.compile_threads)
    left = args.time_budget_s - elapsed()
    if index > 0 and estimate > left:
      skipped.append(unit)
      say(f"# skipped: {unit.label} (estimated {estimate:.0f} s, {max(left, 0):.0f} s left)")
      results.write({"kind": "skipped", "unit": unit.label, "estimate_s": estimate,
                     "left_s": left})
      continue
    unit_start = elapsed()
    try:
      key = (unit.model, unit.dtype)
      if key not in held:
        held[key] = ModelDtype(unit.model, unit.dtype, args.batch_size)
      row = measure_unit(unit, held[key], args, measured, results)
    except Exception as error:  # noqa: BLE001 -- one failed unit must not lose the others
      say(f"# failed: {unit.label}: {type(error).__name__}: {error}")
      results.write({"kind": "failed", "unit": unit.label, "error": traceback.format_exc()})
      continue
    finally:
      if (unit.model, unit.dtype) in held:
        # The standard step stays for the larger m of this model and dtype.
        held[(unit.model, unit.dtype)].release(variants_of(unit)[1:])
    compiled.update((unit.model, unit.dtype, v) for v in variants_of(unit))
    say(markdown_row(row))
    results.add_row(row)
    results.write({"kind": "unit_time", "unit": unit.label, "seconds": elapsed() - unit_start,
                   "estimate_s": estimate})

  say(f"# done in {elapsed():.0f} s; {len(results.rows)} rows, {len(skipped)} skipped"
      + (": " + ", ".join(u.label for u in skipped) if skipped else ""))
  results.write({"kind": "done", "elapsed_s": elapsed(), "skipped": [u.label for u in skipped]})
  say(f"# {device.device_kind}, batch {args.batch_size}; medians of {args.repeats} interleaved "
      "rounds; memory in MiB")
  common.print_table(TABLE_HEADER, results.rows)
  say(f"# saved: {results.path}, {results.table_path}")


if __name__ == "__main__":
  main(parse_args())
