"""The check a training program makes before importing anything: is the training stack there?

The library alone (`pip install maxup-jax`) does not bring it; this module
imports nothing but the standard library, so it can run first.
"""

import importlib.util
import sys

# What the `train` extra installs, by import name.
TRAINING_STACK = ("absl", "ml_collections", "tensorflow_datasets", "array_record", "grain", "PIL",
                  "orbax", "etils", "tensorboardX", "matplotlib", "tqdm")


def require_training_stack(program: str) -> None:
  """Exits naming the extra to install if any module of the training stack is missing."""
  missing = [module for module in TRAINING_STACK if importlib.util.find_spec(module) is None]
  if missing:
    sys.exit(f"{program} needs the training stack, which is not installed (missing: "
             f"{', '.join(missing)}). Install it with: pip install \"maxup-jax[train]\" "
             "(in a checkout, ./make_venv.sh installs it into .venv).")
