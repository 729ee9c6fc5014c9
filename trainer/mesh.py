"""The device mesh every training program runs on: one 'data' axis."""

import jax
import numpy as np

DATA_AXIS = "data"


def create_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A one-axis ('data') mesh over every device, or over the first `num_devices`."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1 or not 0 < num_devices <= len(devices):
      raise ValueError(
          f"num_devices={num_devices}; must be 0 (all) or in [1, {len(devices)}] in a "
          "single-process run")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))
