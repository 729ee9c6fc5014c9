"""What every task builds on: the device mesh and its shardings, config checks, the guarded update.

Both tasks (`trainer.image`, `trainer.language`) and every program that builds
their steps (train.py, the benchmarks, the TPU compile report, certification)
take these from here, so that a batch is split, a state placed, a config
checked and a NaN step skipped the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxup_jax import smoothing

# The mesh's one axis: the global batch is split along it, and randomized
# smoothing's noise batches on the same mesh.
DATA_AXIS = smoothing.DATA_AXIS
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------
# The mesh and where arrays live on it.


def create_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A one-axis (`DATA_AXIS`) mesh over every device, or over the first `num_devices`."""
  devices = jax.devices()
  if num_devices:
    if jax.process_count() > 1 or not 0 < num_devices <= len(devices):
      raise ValueError(
          f"num_devices={num_devices}; must be 0 (all) or in [1, {len(devices)}] in a "
          "single-process run")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))


def data_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Split along the leading (batch or stream) axis over `DATA_AXIS`."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """A whole copy on every device."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract(tree: Any, shardings: Any) -> Any:
  """`tree`'s arrays (or shape/dtype structs) as `jax.ShapeDtypeStruct`s placed by `shardings`:
  one sharding for every leaf, or a tree of them with `tree`'s structure."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def shardings_of(abstract_tree: Any) -> Any:
  """The shardings an `abstract` tree carries, with its structure."""
  return jax.tree.map(lambda x: x.sharding, abstract_tree)


def split_seed(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init_key, train_key) of a run: the initial weights' key and the key every step's is folded from."""
  init_key, train_key = jax.random.split(jax.random.key(seed))
  return init_key, train_key


@dataclasses.dataclass(frozen=True)
class Steps:
  """What a task's `build_steps` makes of a config on a mesh, before any data or weights exist.

  Each task extends it with its model, optimizer and evaluation steps. The
  training loop trains with it, and the TPU compile report compiles its
  steps from the abstract state and batches.

  Attributes:
    init_fn: () -> the initial train state (pure; `init_state` runs it placed).
    abstract_state: the train state as `jax.ShapeDtypeStruct`s carrying their shardings.
    data_sharding: the batches' sharding (split along `DATA_AXIS`).
    init_key: the key of the initial weights.
    train_key: the key every step's key is folded from (`jax.random.fold_in(train_key, step)`).
    train_steps: m -> the jitted train step with m copies (m = 1: standard augmentation),
      for m in {1, maxup.num_copies}; the state is donated.
  """

  init_fn: Callable[[], Any]
  abstract_state: Any
  data_sharding: jax.sharding.NamedSharding
  init_key: jax.Array
  train_key: jax.Array
  train_steps: dict

  @property
  def replicated(self) -> jax.sharding.NamedSharding:
    return replicated(self.data_sharding.mesh)

  def init_state(self) -> Any:
    """The initial train state, placed as `abstract_state` says."""
    return jax.jit(self.init_fn, out_shardings=shardings_of(self.abstract_state))()

  def abstract_key(self) -> jax.ShapeDtypeStruct:
    """A step's key as a replicated `jax.ShapeDtypeStruct`."""
    return jax.ShapeDtypeStruct(self.train_key.shape, self.train_key.dtype,
                                sharding=self.replicated)


# ---------------------------------------------------------------------------
# Config checks: every mistake is reported, together, before any data is read.


def is_int_at_least(value: Any, minimum: int) -> bool:
  """Whether a count holds an int (a bool is not one) >= minimum."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def require_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an int, if it is one (a numpy integer too, a bool not) >= `minimum`.

  Raises:
    ValueError: naming `name`, `value` and what would be valid.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    raise ValueError(f"{name} must be {what}, got {value!r}.")
  return int(value)


class ConfigErrors:
  """Collects one message per bad config field; `raise_if_any` reports them all at once."""

  def __init__(self):
    self.messages: list[str] = []

  def check(self, ok: bool, message: str) -> None:
    """Records `message` unless `ok`."""
    if not ok:
      self.messages.append(message)

  def int_at_least(self, name: str, value: Any, minimum: int, meaning: str = "") -> bool:
    """Checks that field `name` holds an int >= `minimum`; `meaning` says what an edge value
    does, e.g. '0 = off'. Returns whether it does."""
    ok = is_int_at_least(value, minimum)
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    self.check(ok, f"{name}={value!r}; must be {what}" + (f" ({meaning})" if meaning else ""))
    return ok

  def at_least(self, name: str, value: Any, minimum: float, meaning: str = "") -> None:
    """Checks that number field `name` is >= `minimum`."""
    self.check(value >= minimum,
               f"{name}={value}; must be >= {minimum:g}" + (f" ({meaning})" if meaning else ""))

  def one_of(self, name: str, value: Any, valid) -> None:
    """Checks that field `name` is one of `valid`."""
    self.check(value in valid, f"{name}={value!r}; valid: {list(valid)}")

  def divisible_batch(self, name: str, batch_size: Any, num_devices: int) -> None:
    """Checks that a global batch of `batch_size` splits evenly over `num_devices`."""
    if is_int_at_least(batch_size, 1):
      self.check(batch_size % num_devices == 0,
                 f"{name}={batch_size} is not divisible by the {num_devices} devices; "
                 f"use a multiple of {num_devices}")

  def raise_if_any(self) -> None:
    """Raises ValueError listing every recorded message, if there are any."""
    if self.messages:
      raise ValueError("invalid config:\n  " + "\n  ".join(self.messages))


# ---------------------------------------------------------------------------
# The end of every train step.


def all_finite(*trees) -> jax.Array:
  """A bool scalar: every element of every array in `trees` is finite (no NaN, no inf)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def guard_nonfinite(old_state, new_state, loss: jax.Array, grad_norm: jax.Array,
                    skip_nonfinite: bool) -> tuple[Any, jax.Array]:
  """Checks a step's loss, gradient and updated weights for NaN/inf.

  Args:
    old_state, new_state: the state before and after the step; both have
      `step` and `params` fields.
    loss: the step's scalar loss.
    grad_norm: the gradient's global norm (`optax.tree.norm`).
    skip_nonfinite: with a NaN/inf, return `old_state` (its step advanced)
      instead of `new_state`.

  Returns:
    (state, nonfinite): the state to keep, and 1.0 if the loss, the gradient
    or the new weights hold a NaN/inf (an update can overflow the weights
    while both are finite), else 0.0.
  """
  finite = all_finite(loss, grad_norm, new_state.params)
  if skip_nonfinite:
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, old_state.replace(step=new_state.step))
  return new_state, 1.0 - finite.astype(jnp.float32)
