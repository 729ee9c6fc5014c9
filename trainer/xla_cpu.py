"""XLA:CPU settings for the training programs, applied before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first computation starts the backend, and
aborts the process on a flag its build does not know. So a flag is only added
when the installed jaxlib's binaries name it, and never over the user's own
setting of the same flag.

The one default: convolutions on XLA's Eigen kernels instead of YNNPACK's
(`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`); see
BENCHMARKS.md for what it gains on which CPU and jaxlib. The flag only
touches XLA:CPU, so GPU and TPU runs are unaffected.
"""

from __future__ import annotations

import glob
import importlib.util
import mmap
import os
from typing import Iterable, MutableMapping

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS = f"--{YNN_FUSION_FLAG}=-individual_convolution"
# Both the flag and the value must be in the binary: an unknown value aborts
# as surely as an unknown flag. The parser maps `individual_convolution` to
# this enum name.
_REQUIRED_NAMES = (YNN_FUSION_FLAG.encode(), b"LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
# Set to 0 to run with XLA's own defaults.
OPT_OUT = "MAXUP_JAX_XLA_DEFAULTS"


def jaxlib_libraries() -> list[str]:
  """The shared libraries of the installed jaxlib (empty if jaxlib is not installed)."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return []
  paths = []
  for location in spec.submodule_search_locations:
    paths += glob.glob(os.path.join(location, "**", "*.so"), recursive=True)
  return sorted(paths)


def libraries_define(names: Iterable[bytes], libraries: Iterable[str]) -> bool:
  """True if every name occurs in at least one of the files."""
  missing = set(names)
  for path in libraries:
    try:
      with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        missing = {name for name in missing if data.find(name) < 0}
    except (OSError, ValueError):  # unreadable, or empty (mmap of 0 bytes)
      continue
    if not missing:
      return True
  return False


def apply_defaults(environ: MutableMapping[str, str] = os.environ,
                   libraries: Iterable[str] | None = None) -> list[str]:
  """Adds the default XLA:CPU flags to `environ['XLA_FLAGS']` where safe.

  Call before the first JAX computation (importing jax is fine). A flag is
  skipped when `XLA_FLAGS` already sets it (the user's choice wins) or when
  the jaxlib's libraries do not name it; `MAXUP_JAX_XLA_DEFAULTS=0` in the
  environment skips them all.

  Args:
    environ: the environment to change.
    libraries: the jaxlib shared libraries to look in; default the installed ones.

  Returns:
    The flags added.
  """
  current = environ.get("XLA_FLAGS", "")
  if environ.get(OPT_OUT) == "0" or YNN_FUSION_FLAG in current:
    return []
  if not libraries_define(_REQUIRED_NAMES, jaxlib_libraries() if libraries is None else libraries):
    return []
  environ["XLA_FLAGS"] = f"{current} {EIGEN_CONVOLUTIONS}".strip()
  return [EIGEN_CONVOLUTIONS]
