"""Peak memory of the standard, MaxUp two-pass and single-pass steps, from XLA itself.

Compiles each step (nothing runs) and reads XLA's buffer assignment
(`jitted.lower(...).compile().memory_analysis()`):

  temp      the scratch buffer XLA allocates for one execution: the peak of
            all intermediate values (activations kept for the backward pass,
            the selection pass's copies, gradients) live at once;
  argument  the inputs (train state, batch, key);
  output    the outputs (new state, metrics);
  alias     outputs written in place of donated inputs (counted once).

peak = temp + argument + output - alias is the memory one step holds at its
busiest moment; on CPU, and on GPU without fragmentation, it is exact.

  python -m benchmarks.memory                          # ResNet-20 and ResNet-110, m=1,2,4,10
  python -m benchmarks.memory --models wrn28_10 --copies 4
  python -m benchmarks.memory --models resnet110 --copies 10 --remat
"""

from __future__ import annotations

import argparse

from benchmarks import common
from trainer import timing

MIB = 2**20


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="resnet20,resnet110")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--copies", default="2,4,10")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", action="store_true",
                      help="Rematerialise each residual block (config.remat).")
  return parser.parse_args(argv)


def step_memory(jitted, state, batch, key) -> dict[str, float]:
  """XLA's memory analysis of one compiled call, in MiB."""
  analysis = jitted.lower(state, batch, key).compile().memory_analysis()
  sizes = {
      "temp": analysis.temp_size_in_bytes,
      "argument": analysis.argument_size_in_bytes,
      "output": analysis.output_size_in_bytes,
      "alias": analysis.alias_size_in_bytes,
  }
  sizes["peak"] = sizes["temp"] + sizes["argument"] + sizes["output"] - sizes["alias"]
  return {k: v / MIB for k, v in sizes.items()}


def main(args):
  copies = [int(m) for m in args.copies.split(",")]
  timing.print_environment(batch_size=args.batch_size, dtype=args.dtype)
  rows = []
  for model_name in args.models.split(","):
    config = common.benchmark_config(model_name, args.batch_size, args.dtype, remat=args.remat)
    steps = common.image_steps(common.with_maxup(config, num_copies=1))
    state, batch, key = (steps.abstract_state, steps.abstract_batch(args.batch_size),
                         steps.abstract_key())
    standard = step_memory(steps.train_steps[1], state, batch, key)
    rows.append([model_name, "standard", 1, standard["temp"], standard["argument"],
                 standard["output"], standard["alias"], standard["peak"], 1.0])
    for m in copies:
      for mode in ("two_pass", "single_pass"):
        variant = common.image_steps(common.with_maxup(config, num_copies=m, mode=mode))
        mem = step_memory(variant.train_steps[m], state, batch, key)
        rows.append([model_name, mode, m, mem["temp"], mem["argument"], mem["output"],
                     mem["alias"], mem["peak"], mem["peak"] / standard["peak"]])
      print(f"# done: {model_name} m={m}", flush=True)
  print(f"# batch {args.batch_size}, {args.dtype}, remat={args.remat}; sizes in MiB from "
        "XLA's compiled memory analysis")
  common.print_table(["model", "step", "m", "temp", "argument", "output", "alias (donated)",
                      "peak", "peak / standard"], rows)


if __name__ == "__main__":
  main(parse_args())
