"""What a traced array's type says about its sharding, under JAX's explicit sharding mode.

In the default (auto) sharding mode a traced array carries no sharding and
XLA's partitioner places every intermediate; in explicit mode
(`jax.make_mesh(..., axis_types=(AxisType.Explicit,))`, `jax.set_mesh`) the
sharding is part of the type, and operations whose output sharding is
ambiguous (a gather across devices, an array built from scratch next to a
sharded one) must be told. These helpers tell them, and do nothing in auto
mode.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, PartitionSpec


def explicit_batch_axes(x: jax.Array):
  """The explicit mesh axes sharding `x`'s leading (batch) axis, or None.

  None in auto mode, outside any mesh, for a replicated batch axis, or for
  a 0-d array.
  """
  axes = _explicit_axes_per_dim(x)
  return axes[0] if axes else None


def _explicit_axes_per_dim(x: jax.Array) -> tuple:
  """Per axis of `x`: the mesh axes it is split over if they are all explicit, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return (None,) * x.ndim
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  return tuple(
      axes if axes is not None and all(
          types[name] == AxisType.Explicit for name in (axes if isinstance(axes, tuple) else (axes,)))
      else None
      for axes in spec)


def shard_axis_like(x: jax.Array, axis: int, axes) -> jax.Array:
  """`x` resharded so that `axis` is split over the mesh `axes` (no-op if None)."""
  if axes is None:
    return x
  spec = [None] * x.ndim
  spec[axis] = axes
  return jax.sharding.reshard(x, PartitionSpec(*spec))


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """`x[index]` (rows of `x` at an integer array), also under explicit sharding.

  Rows may live on other devices (a CutMix partner), so when `x` is
  explicitly sharded it is first gathered to every device; the result is
  sharded like `index` (an embedding lookup of sharded tokens in a
  replicated table gives sharded embeddings).
  """
  index_spec = explicit_spec(index)
  if explicit_batch_axes(x) is None and index_spec is None:
    return x[index]
  x = jax.sharding.reshard(x, PartitionSpec())
  index_spec = index_spec or (None,) * index.ndim
  return x.at[index].get(out_sharding=PartitionSpec(*index_spec, *([None] * (x.ndim - 1))))


def explicit_spec(x: jax.Array):
  """`x`'s partition spec, one entry per axis, if any axis is explicitly sharded; else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  if not any(_explicit_axes_per_dim(x)):
    return None
  return tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
