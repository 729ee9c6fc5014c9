"""What XLA:CPU and JAX settings do to the training step: one subprocess per setting.

XLA reads XLA_FLAGS once per process, so every setting runs in its own
subprocess, which times the standard step and the MaxUp two-pass step
(ResNet-20 by default) in interleaved rounds. The baseline runs first and
last, so drift of the machine's load between subprocesses shows.

  python -m benchmarks.xla_attempts                 # every attempt below
  python -m benchmarks.xla_attempts --only baseline,onednn
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# The attempts' subprocesses start from the XLA_FLAGS this process was given:
# importing `common` adds train.py's XLA:CPU defaults to this process's own.
GIVEN_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")

from benchmarks import common  # noqa: E402
from trainer import timing  # noqa: E402

# name -> (XLA_FLAGS, extra worker arguments). Every attempt runs on XLA's own
# defaults plus its flags (MAXUP_JAX_XLA_DEFAULTS=0), so "baseline" is stock
# XLA:CPU and "no YNNPACK convolutions" is what train.py runs by default.
ATTEMPTS = {
    "baseline": ("", []),
    "no YNNPACK convolutions (Eigen)": (
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", []),
    "YNNPACK also for eltwise+reduce": (
        "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce", []),
    "oneDNN": ("--xla_cpu_use_onednn=true", []),
    "XNNPACK": ("--xla_cpu_use_xnnpack=true", []),
    "fast math": ("--xla_cpu_enable_fast_math=true", []),
    "single-threaded Eigen": ("--xla_cpu_multi_thread_eigen=false", []),
    "no donation": ("", ["--no_donate"]),
    "bfloat16 compute": ("", ["--dtype=bfloat16"]),
    "baseline (again)": ("", []),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_copies", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--only", default="", help="comma-separated names of ATTEMPTS keys "
                      "(or their first word)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--no_donate", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def worker(args):
  """Times the two steps in this process; prints one JSON line."""
  config = common.with_maxup(common.benchmark_config(args.model, args.batch_size, args.dtype),
                             num_copies=args.num_copies)
  steps = common.image_steps(config)
  batch = common.random_batch(steps, args.batch_size)
  runners = {}
  compile_seconds = {}
  for name, m in (("standard", 1), ("maxup", args.num_copies)):
    step_fn = common.undonated(steps.train_steps[m]) if args.no_donate else steps.train_steps[m]
    runner = common.image_runner(steps, step_fn, batch)
    start = time.perf_counter()
    runner()
    compile_seconds[name] = time.perf_counter() - start
    runners[name] = runner
  times = timing.interleaved_medians(runners, args.repeats, warmup=1)
  print(json.dumps({"times": times, "first_call_seconds": compile_seconds,
                    "loadavg": os.getloadavg()}))


def main(args):
  wanted = [w.strip() for w in args.only.split(",") if w.strip()]
  names = [n for n in ATTEMPTS if not wanted or n in wanted or n.split()[0] in wanted]
  timing.print_environment(model=args.model, batch_size=args.batch_size,
                           num_copies=args.num_copies, repeats=args.repeats,
                           XLA_FLAGS=GIVEN_XLA_FLAGS)
  rows = []
  for name in names:
    flags, extra = ATTEMPTS[name]
    env = dict(os.environ, MAXUP_JAX_XLA_DEFAULTS="0")
    env["XLA_FLAGS"] = (GIVEN_XLA_FLAGS + " " + flags).strip()
    command = [sys.executable, "-m", "benchmarks.xla_attempts", "--worker", "--model", args.model,
               "--batch_size", str(args.batch_size), "--num_copies", str(args.num_copies),
               "--repeats", str(args.repeats)] + extra
    result = subprocess.run(command, env=env, cwd=common.REPO, capture_output=True, text=True)
    lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
    if result.returncode or not lines:
      error = (result.stderr.strip().splitlines() or ["?"])[-1]
      rows.append([name, flags or " ".join(extra), "failed", error[:80], "", "", "", ""])
      continue
    out = json.loads(lines[-1])
    standard, maxup = out["times"]["standard"], out["times"]["maxup"]
    rows.append([name, flags or " ".join(extra) or "-",
                 1000 * min(standard), 1000 * timing.median(standard),
                 1000 * min(maxup), 1000 * timing.median(maxup),
                 out["first_call_seconds"]["maxup"], "%.1f" % out["loadavg"][0]])
    print(f"# done: {name}", flush=True)
  common.print_table(
      ["attempt", "setting", "standard ms (min)", "standard ms (median)",
       f"MaxUp m={args.num_copies} ms (min)", f"MaxUp m={args.num_copies} ms (median)",
       "MaxUp compile+first step s", "loadavg"], rows)


if __name__ == "__main__":
  ARGS = parse_args()
  worker(ARGS) if ARGS.worker else main(ARGS)
