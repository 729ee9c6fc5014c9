"""A terminal progress bar for long loops, shown by process 0 only."""

import jax
import tqdm


def bar(total: int, initial: int = 0, desc: str = "") -> tqdm.tqdm:
  """A tqdm bar; silent on other processes and when stderr is not a terminal."""
  disable = None if jax.process_index() == 0 else True
  return tqdm.tqdm(total=total, initial=initial, desc=desc, disable=disable,
                   dynamic_ncols=True, smoothing=0.1)
