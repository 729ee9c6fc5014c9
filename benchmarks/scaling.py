"""The MaxUp step on 1, 2 and 4 simulated CPU devices: sharding, compile time, recompilation.

Runs with XLA_FLAGS=--xla_force_host_platform_device_count=4 (set here unless
already set), so one process sees four CPU "devices" that share the same
cores: step times show the cost of the partitioned program, not a speed-up.
For every device count, from the same initial state and the same batches
and keys, it checks

  * that the losses match the single-device run (BatchNorm statistics are
    over the global batch, so the trajectory must not depend on the mesh),
  * that the batch really is sharded and the state replicated,
  * the compile time of the first call and that later steps do not compile
    again (the jitted function's cache holds one executable).

  python benchmarks/scaling.py
  python benchmarks/scaling.py --model resnet20 --num_copies 4 --steps 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--num_copies", type=int, default=4)
  parser.add_argument("--steps", type=int, default=4, help="steps after the first")
  parser.add_argument("--devices", default="1,2,4")
  return parser.parse_args(argv)


def main(args):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **kw: compiles.append(duration) if event == COMPILE_EVENT else None)
  common.print_environment(model=args.model, batch_size=args.batch_size,
                           num_copies=args.num_copies, steps=args.steps)
  rows, reference_losses = [], None
  for num_devices in [int(n) for n in args.devices.split(",")]:
    steps = common.Steps(args.model, args.batch_size, num_devices=num_devices)
    state = steps.initial_state()
    step_fn = steps.train_step(args.num_copies)
    batches = [steps.batch(seed) for seed in range(args.steps + 1)]
    key = jax.random.key(1)
    batch_shards = {s.device for s in batches[0]["image"].addressable_shards}
    assert len(batch_shards) == num_devices, batch_shards
    assert batches[0]["image"].addressable_shards[0].data.shape[0] == (
        args.batch_size // num_devices)

    start = time.perf_counter()
    state, metrics = step_fn(state, batches[0], jax.random.fold_in(key, 0))
    losses = [float(metrics["loss"])]
    first_call = time.perf_counter() - start
    compiles_after_first = len(compiles)
    step_times = []
    for i in range(1, args.steps + 1):
      start = time.perf_counter()
      state, metrics = step_fn(state, batches[i], jax.random.fold_in(key, i))
      losses.append(float(metrics["loss"]))
      step_times.append(time.perf_counter() - start)
    recompiled = len(compiles) - compiles_after_first
    assert step_fn._cache_size() == 1 and recompiled == 0, "the step recompiled"
    param = jax.tree.leaves(state.params)[0]
    assert param.sharding.is_fully_replicated
    if reference_losses is None:
      reference_losses = losses
    max_diff = float(np.max(np.abs(np.array(losses) - np.array(reference_losses))))
    rows.append([num_devices, first_call, 1000 * common.median(step_times),
                 step_fn._cache_size(), recompiled, " ".join(f"{l:.4f}" for l in losses),
                 f"{max_diff:.1e}"])
    print(f"# done: {num_devices} devices", flush=True)
  print(f"# {args.model}, global batch {args.batch_size}, MaxUp two-pass m={args.num_copies}; "
        f"loadavg after: {'%.2f %.2f %.2f' % os.getloadavg()}")
  common.print_table(["devices", "compile + first step s", "step ms (median)",
                      "executables cached", "compilations after first step", "losses",
                      "max |loss - 1-device loss|"], rows)


if __name__ == "__main__":
  main(parse_args())
