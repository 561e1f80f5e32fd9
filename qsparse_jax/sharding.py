"""Device meshes and logical-axis sharding: the only module that knows the mesh axis names.

Parameters carry logical axis names ("embed", "mlp", "heads", "kv_heads", "vocab") as metadata (layers.py); one
rules table maps them onto the mesh axes ("data", "fsdp", "tensor"), and `shard_train_state` places a train state on
a mesh with jit + NamedSharding (the pjit way). Batches are split over ("data", "fsdp").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
  """Mesh sizes over (data, fsdp, tensor); one of them may be -1 for "all remaining devices"."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1:
      raise ValueError(f"at most one mesh axis may be -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}")
    if any(s == 0 or s < -1 for s in sizes):
      raise ValueError(f"mesh sizes must be positive or -1, got data={self.data} fsdp={self.fsdp} "
                       f"tensor={self.tensor}")
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
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.shape(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


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


def param_shardings(params, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an nnx.State of parameters, from their logical axis names."""
  specs = nnx.get_partition_spec(params)  # logical names, from each parameter's out_sharding metadata
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh(tuple(spec), rules)), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(("batch", None)))


def shard_train_state(state: dict, tx, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
  """Place {"step", "params", "opt_state"} on the mesh: params by their logical names, optimizer moments alike
  (re-initialised from the sharded params when the state is fresh), the step replicated."""
  shardings = param_shardings(state["params"], mesh, rules)
  params = jax.device_put(state["params"], shardings)
  replicated = NamedSharding(mesh, PartitionSpec())

  def on_mesh(like):  # moments follow their parameter's sharding; scalars (counts) are replicated
    sharding_ = like.sharding
    return sharding_ if isinstance(sharding_, NamedSharding) and sharding_.mesh == mesh else replicated

  fresh = jax.jit(tx.init)(params)
  opt_state = jax.tree.map(lambda new, old: jax.device_put(old, on_mesh(new)), fresh, state["opt_state"])
  return {"step": jax.device_put(state["step"], NamedSharding(mesh, PartitionSpec())), "params": params,
          "opt_state": opt_state}


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
