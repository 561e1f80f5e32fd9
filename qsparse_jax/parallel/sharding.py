"""Device meshes and logical-axis sharding: the only module that knows the mesh axis names.

Parameters carry logical axis names ("embed", "mlp", "heads", "kv_heads", "vocab") as metadata (qsparse_jax.nn.linear.logical_axes); one
rules table maps them onto the mesh axes ("data", "fsdp", "tensor"), and `shard_train_state` places a train state on
a mesh with jit + NamedSharding (the pjit way). Batches are split over ("data", "fsdp").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None: replicated). Activations' batch axis goes over data and fsdp together.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh sizes over (data, fsdp, tensor); one of them may be -1 for "all remaining devices".

  The default, data=-1, is plain data parallelism over every device; large models set fsdp=-1 (parameters and
  optimizer state split over all devices) and tensor to the devices of one host or fewer.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    for name, size in sizes.items():
      if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
        raise ValueError(f"mesh.{name} must be a positive integer or -1 (all remaining devices), got {size!r}")
    if list(sizes.values()).count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}")

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(f"{num_devices} devices cannot be split into a mesh with fixed sizes multiplying to {known}")
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs {math.prod(sizes)} "
                       f"devices, {num_devices} are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

  jax.make_mesh orders devices by the physical topology (TPU ICI rings); tensor is the innermost axis, so it stays
  within a host where it can, and the batch axes split across hosts.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh(names: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
  """The PartitionSpec of a tensor whose axes have these logical names; unknown names are replicated.

  Raises ValueError when two axes of one tensor would land on the same mesh axis.
  """
  table = dict(rules)
  spec, used = [], {}
  for name in names:
    target = table.get(name) if name is not None else None
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is None:
        continue
      if axis in used:
        raise ValueError(f"logical axes {used[axis]!r} and {name!r} of one tensor both map to mesh axis {axis!r}; "
                         "change the sharding rules")
      used[axis] = name
    spec.append(target)
  return PartitionSpec(*spec)


def _divisible(spec: PartitionSpec, shape: Sequence[int], mesh_shape) -> PartitionSpec:
  """spec with every axis whose size its mesh axes do not divide left unsplit (a 257-token byte vocabulary)."""
  kept = []
  for size, target in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = target if isinstance(target, tuple) else (target,) if target else ()
    kept.append(target if size % math.prod(mesh_shape[a] for a in axes) == 0 else None)
  return PartitionSpec(*kept)


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State of parameters (arrays or ShapeDtypeStructs), from their logical axis names.

  An axis whose size does not divide evenly over its mesh axes stays whole.
  """
  specs = nnx.get_partition_spec(params)  # logical names, from each parameter's out_sharding metadata
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, _divisible(logical_to_mesh(tuple(spec), rules), leaf.shape, mesh.shape)),
      specs, params, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """Pin an activation's sharding by logical axis names inside a jitted function traced under `jax.set_mesh`.

  Outside a mesh context this is the identity, so models run unchanged on one device. An axis whose size the mesh
  axes do not divide (batch 1 while decoding) is left to the compiler.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, _divisible(logical_to_mesh(names, rules), x.shape, mesh.shape))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(("batch", None)))


def process_batch_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """(shard index, shard count) of the batch rows this process feeds: processes holding the same rows (a tensor
  axis spanning hosts) read the same data shard; the others read disjoint ones."""
  if batch_size % math.prod(mesh.shape[a] for a in ("data", "fsdp")):
    raise ValueError(f"train.batch_size={batch_size} must be a multiple of mesh data x fsdp = "
                     f"{mesh.shape['data']} x {mesh.shape['fsdp']}")
  index_map = batch_sharding(mesh).devices_indices_map((batch_size, 1))
  rows = sorted({row for device, index in index_map.items() if device.process_index == jax.process_index()
                 for row in range(*index[0].indices(batch_size))})
  lo, hi = rows[0], rows[-1] + 1
  if len(rows) != hi - lo or lo % (hi - lo):
    raise ValueError(f"the devices of process {jax.process_index()} hold batch rows {rows}, not one aligned block "
                     "of the global batch; build the mesh so that each host's devices are adjacent on it")
  return lo // (hi - lo), batch_size // (hi - lo)


def make_global_batch(local_bt: np.ndarray, mesh: Mesh, global_rows: int) -> jax.Array:
  """One global jax.Array [global_rows, T] from each process's own rows (the pjit way of feeding a mesh)."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_bt, (global_rows, *local_bt.shape[1:]))


class _OnMesh:
  """A jitted function that traces, lowers and runs under jax.set_mesh(mesh)."""

  def __init__(self, jitted, mesh: Mesh):
    self.jitted, self.mesh = jitted, mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def jit_on_mesh(fn, mesh: Mesh, *, in_shardings, out_shardings, donate_argnums=()) -> _OnMesh:
  """jax.jit(fn) with explicit shardings, traced and run under jax.set_mesh(mesh) so that the model's activation
  constraints (`constrain`) apply."""
  return _OnMesh(jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums),
                 mesh)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def train_state_shardings(state: dict, tx: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """NamedShardings for a train state {"step", "params", "opt_state"} (arrays or jax.ShapeDtypeStruct leaves).

  Parameters by their logical names; every optimizer moment like its parameter (optax.tree_map_params finds them),
  so FSDP splits the Adam state too; counts and the step replicated.
  """
  params = param_shardings(state["params"], mesh, rules)
  opt_state = optax.tree_map_params(tx, lambda _, sharding_: sharding_, state["opt_state"], params,
                                    transform_non_params=lambda _: replicated(mesh),
                                    is_leaf=lambda x: isinstance(x, NamedSharding))
  return {"step": replicated(mesh), "params": params, "opt_state": opt_state}


def shard_train_state(state: dict, tx: optax.GradientTransformation, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """The train state placed on the mesh (see train_state_shardings)."""
  return jax.device_put(state, train_state_shardings(state, tx, mesh, rules))


def assert_params_sharded(params, *, min_fraction: float = 0.5, min_size: int = 1 << 16) -> None:
  """Raise if any parameter of min_size elements or more keeps more than (1 − min_fraction) of itself on one device.

  A per-tensor form of MaxText's assert_params_sufficiently_sharded: with the default, every large parameter must be
  split at least in two.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if leaf.size < min_size:
      continue
    shard = leaf.addressable_shards[0].data
    if shard.size > (1 - min_fraction) * leaf.size:
      raise AssertionError(f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} is not sharded enough: "
                           f"one device holds {shard.size / leaf.size:.0%} of it")
