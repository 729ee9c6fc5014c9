"""Test-wide setup: four simulated CPU devices, so multi-device code runs on any machine.

The tests run stock XLA:CPU, without train.py's default flags
(`trainer/xla_cpu.py`, tested on its own in test_xla_cpu.py): with XLA's
Eigen convolutions, the resume tests, which compare this 4-device process
with 1-device train.py subprocesses to 1e-6, saw parameters differ by up to
6e-5 after 8 steps (and agree without them).
"""

import os

# Must happen before JAX initialises its backends; single-device code keeps
# using device 0, so this costs the other tests nothing.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
# Inherited by every train.py / benchmark subprocess the tests start.
os.environ["MAXUP_JAX_XLA_DEFAULTS"] = "0"
