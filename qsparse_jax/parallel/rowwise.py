"""Row-wise functions run per shard inside a mesh: each device selects the top-K of its own rows (method.md §1).

Top-K selection (qsparse_jax.ops.selection: a bisection `lax.while_loop` that stops when every row of a block has
its threshold) and per-token absmax quantization (method.md §4) read each row on its own. Left to XLA's partitioner
inside a jitted program on a mesh, the selection of a row split over devices all-reduces its counts at every
bisection step and the loop's stop condition across the batch's devices (one collective per step, inside the
loop). `rowwise` runs such a function under `jax.shard_map` instead: rows split over the batch's mesh axes
("data", "fsdp", the logical "batch" of parallel.sharding), every other axis whole, so each device runs its own
loops on its own rows with no collective inside them. A row that arrives split over "tensor" (the heads or the
feed-forward width) is gathered once, before the loops: the selection needs the whole row.

Shapes: R rows (the leading axis, split over the batch's mesh axes), then any others.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from qsparse_jax.parallel.sharding import DEFAULT_RULES

BATCH_AXES: tuple[str, ...] = dict(DEFAULT_RULES)["batch"]  # ("data", "fsdp")


def row_axes(rows: int) -> tuple[str, ...]:
  """The mesh axes of the current abstract mesh (jax.set_mesh) that `rowwise` splits R rows over: the batch's axes
  of size > 1 that are not manual already; () outside a mesh, inside a shard_map over them, or when their sizes do
  not divide R (one sequence while decoding)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(name in mesh.manual_axes for name in BATCH_AXES if name in mesh.axis_names):
    return ()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  axes = tuple(name for name in BATCH_AXES if sizes.get(name, 1) > 1)
  return axes if axes and rows % math.prod(sizes[a] for a in axes) == 0 else ()


def rowwise(fn: Callable, x: jax.Array, *, straight_through: bool = False):
  """fn(x) computed per shard of rows: x's leading axis R is split over the batch's mesh axes, its other axes whole
  (replicated over "tensor"), and so is the output's.

  fn must be row-wise (output row r depends on row r of x only: top-K sparsification, absmax quantization) and
  return one array or a tuple of arrays whose leading axis is R. It may carry a custom_vjp (the straight-through
  rule, method.md §2): the backward pass is jax.vjp(fn) per shard too (`_per_shard`), on whole rows of the
  cotangent. straight_through: fn's vjp is the identity (the straight-through estimator of method.md §2, with the
  "ste" rule and no rescale), so the cotangent passes as it is, in whatever layout it comes (no gather of a row
  that the mesh splits over "tensor"). The identity wrapper, fn(x), outside a mesh or when the mesh's batch axes
  do not divide R.
  """
  axes = row_axes(x.shape[0]) if x.ndim else ()
  if not axes:
    return fn(x)
  if straight_through:
    return _per_shard_straight_through(fn, PartitionSpec(axes), x)
  return _per_shard(fn, PartitionSpec(axes), x)


def _shard_map(fn, spec, n_args):
  # check_vma=False: the selection's loops start from constants (invariant) and carry row data (varying), which
  # the varying-axes check refuses; every value here is per shard, and the backward pass never transposes the map.
  return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec,) * n_args, out_specs=spec,
                       check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _per_shard(fn, spec, x):
  """fn(x) under shard_map; its gradient is fn's own vjp, also per shard. Differentiating the shard_map itself
  would transpose it: with check_vma=False that divides the incoming cotangent by the "tensor" size and psums the
  outgoing one over "tensor" (one all-reduce of an activation per site), where the rows' vjp needs no collective."""
  return _shard_map(fn, spec, 1)(x)


def _per_shard_fwd(fn, spec, x):
  return _shard_map(fn, spec, 1)(x), x


def _per_shard_bwd(fn, spec, x, g):
  # fn's forward runs again inside its vjp; XLA drops what the cotangent does not read (all of the selection under
  # the straight-through rule, whose vjp is the identity; the masked rule reads the mask and recomputes it).
  return (_shard_map(lambda x_, g_: jax.vjp(fn, x_)[1](g_)[0], spec, 2)(x, g),)


_per_shard.defvjp(_per_shard_fwd, _per_shard_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _per_shard_straight_through(fn, spec, x):
  """fn(x) under shard_map, whose vjp is the identity (the caller says so: rowwise's straight_through)."""
  return _shard_map(fn, spec, 1)(x)


_per_shard_straight_through.defvjp(lambda fn, spec, x: (_shard_map(fn, spec, 1)(x), None),
                                   lambda fn, spec, _, g: (g,))
