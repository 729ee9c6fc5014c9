"""Test-wide setup: four simulated CPU devices, so multi-device code runs on any machine.

The tests also run with train.py's XLA:CPU defaults, the path users run.
"""

import os

from trainer import xla_cpu

# Must happen before JAX initialises its backends; single-device code keeps
# using device 0, so this costs the other tests nothing.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
xla_cpu.apply_defaults()
