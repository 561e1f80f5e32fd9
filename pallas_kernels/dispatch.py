"""The one backend setting shared by every op ("auto" | "xla" | "pallas") and what the kernels share besides.

The implementation follows the platform a program is compiled for, not the process's default backend: `select`
puts the kernel and the XLA path under `lax.platform_dependent`, which keeps only the branch of the platform being
lowered. So `jax.jit(op).lower(<arguments on TPU devices>).compile()` on a CPU host (libtpu's deviceless topologies)
holds the Mosaic kernel exactly when a TPU would run it, and the same traced program runs the XLA path on the CPU;
compiled for an H100 or H200 (jax's CUDA plugin, deviceless too: tests/test_gpu_kernels.py) it holds the op's Mosaic
GPU kernel where the table says so.

    backend   compiled for TPU                  compiled for an NVIDIA GPU (cuda)       compiled for anything else
    "xla"     the XLA path                      the XLA path                            the XLA path
    "auto"    the kernel where `kernel_ok`      the op's Mosaic GPU kernel where its    the XLA path
              (the op's dtypes and shapes       `GpuKernel.ok` and gpu_verified.RECORD
              shown to compile), else XLA       lists it for that GPU (checked and
                                                faster on a device), else XLA
    "pallas"  the kernel, compiled by Mosaic    the op's Mosaic GPU kernel (ops without the kernel in interpret mode
                                                one: the TPU kernel in interpret mode)  (slow: for tests)

Mosaic kernels are not partitioned by XLA: they run in single-device programs or per shard inside `jax.shard_map`.
So "auto" also takes the XLA path in a program XLA partitions over several devices (`partitioned`: a mesh set by
`jax.set_mesh`, or the arguments' shardings, spans an axis of more than one device that is not manual); running the
kernels per shard there is future work.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import gpu_verified

Backend = Literal["auto", "xla", "pallas"]
BACKENDS = ("auto", "xla", "pallas")
LANES = 128  # the minor dimension of every TPU tile


def check(backend: str) -> None:
  """Raise a ValueError naming the choices unless backend is one of BACKENDS."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")


def _partitions(mesh) -> bool:
  """Whether a (possibly abstract) mesh has an axis of size > 1 that is not manual."""
  if mesh is None or getattr(mesh, "empty", True):
    return False
  manual = set(getattr(mesh, "manual_axes", ()))
  return any(size > 1 and name not in manual for name, size in zip(mesh.axis_names, mesh.axis_sizes))


def partitioned(*args) -> bool:
  """Whether the program being traced is partitioned over devices by XLA: the mesh set by `jax.set_mesh`, or the
  mesh of an argument's sharding (jit over arguments placed on several devices), has an axis of size > 1 that is
  not manual (inside `jax.shard_map` every axis is manual and kernels run per shard)."""
  meshes = [jax.sharding.get_abstract_mesh()]
  for leaf in jax.tree.leaves(args):
    try:
      meshes.append(getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None))
    except TypeError:  # not an array: no sharding
      pass
  return any(_partitions(mesh) for mesh in meshes)


@dataclasses.dataclass(frozen=True)
class GpuKernel:
  """An op's Mosaic GPU kernel for `select`: name, its folder under pallas_kernels/ (the key of gpu_verified.RECORD);
  fn(*args), the kernel on the arguments of `select`; ok, whether "auto" may use it for them (dtypes, shapes)."""

  name: str
  fn: Callable
  ok: bool = True


def select(backend: str, kernel, xla, *args, kernel_ok: bool = True, gpu: GpuKernel | None = None):
  """kernel(*args, interpret=...), gpu.fn(*args) or xla(*args), as the table of the module docstring says.

  kernel_ok: whether "auto" may use the TPU kernel for these arguments (each op's `kernel_supported`); "pallas" uses
  it regardless, and a combination Mosaic cannot compile then fails at compile time for TPU. gpu: the op's Mosaic GPU
  kernel, if it has one. "auto" never picks a kernel in a `partitioned` program.
  """
  check(backend)
  if backend == "xla" or (backend == "auto" and partitioned(*args)):
    return xla(*args)
  interpreted = functools.partial(kernel, interpret=True)
  if backend == "pallas":
    tpu, cuda, default = functools.partial(kernel, interpret=False), (gpu.fn if gpu else interpreted), interpreted
  else:
    tpu = functools.partial(kernel, interpret=False) if kernel_ok else xla
    use_gpu = gpu is not None and gpu.ok and gpu_verified.verified(gpu.name, gpu_verified.target_gpu())
    cuda, default = (gpu.fn if use_gpu else xla), xla
    if tpu is xla and cuda is xla:
      return xla(*args)
  if gpu is None:  # the program of the ops without a GPU kernel stays as it was
    return lax.platform_dependent(*args, tpu=tpu, default=default)
  return lax.platform_dependent(*args, tpu=tpu, cuda=cuda, default=default)


def resolve(backend: str, *, pallas_platforms: tuple[str, ...] = ("tpu",)) -> tuple[str, bool]:
  """(implementation, interpret) that `backend` picks for a supported shape on this process's default platform,
  for reports (scripts/bench_kernels.py); the ops themselves choose by the platform compiled for (`select`)."""
  check(backend)
  platform = jax.default_backend()
  if backend == "xla" or (backend == "auto" and platform not in pallas_platforms):
    return "xla", False
  return "pallas", platform not in pallas_platforms


def tpu_info():
  """The TPU being compiled for (pltpu.TpuInfo: chip_version, vmem_capacity_bytes, ...) while tracing: the chip of
  the mesh set by `jax.set_mesh` (deviceless topologies included), else of the default device; None when that is
  not a TPU (then kernels take block sizes that fit every generation)."""
  try:
    return pltpu.get_tpu_info()
  except (ValueError, NotImplementedError, AttributeError, KeyError, RuntimeError):
    return None


def chip_name() -> str | None:
  """"v5p", "v6e", ... for the TPU being compiled for (see tpu_info), None when it is not a TPU."""
  info = tpu_info()
  return None if info is None else str(info.chip_version)


def sublane_tile(dtype) -> int:
  """Rows of one TPU tile of dtype: 8 for 32-bit types, 16 for 16-bit, 32 for 8-bit (tiles are rows x 128 lanes)."""
  return 32 // jnp.dtype(dtype).itemsize


def round_up(size: int, multiple: int) -> int:
  return -(-size // multiple) * multiple


def largest_block(size: int, preferred: int, multiple: int = LANES) -> int | None:
  """The largest multiple of `multiple` that divides size and is at most preferred (None if there is none)."""
  for block in range(preferred - preferred % multiple, 0, -multiple):
    if size % block == 0:
      return block
  return None


def row_block(rows: int, preferred: int, dtype_tile: int) -> int:
  """Rows per block for an array of `rows` rows padded to a multiple of the result: preferred, or fewer when the
  array is shorter (rounded up to the dtype's sublane tile)."""
  return min(preferred, round_up(max(rows, 1), dtype_tile))


def check_block(owner: str, name: str, block: int, *, multiple: int, why: str) -> None:
  """ValueError unless block is a positive multiple of `multiple` (why: the tiling rule that asks for it)."""
  if not (isinstance(block, int) and block > 0 and block % multiple == 0):
    raise ValueError(f"{owner}.{name} must be a positive multiple of {multiple} ({why}), got {block!r}")


def vmem_limit(working_set: int) -> int | None:
  """A scoped VMEM limit for a kernel whose live data is about working_set bytes: None (Mosaic's default, 16 MiB or
  more on every generation) below 12 MiB, else twice the working set, at most 3/4 of the chip's VMEM (48 MiB where
  the chip is unknown: v5p has 64 MiB per core, v5e and v6e 128 MiB)."""
  if working_set < 12 * 2**20:
    return None
  info = tpu_info()
  cap = 48 * 2**20 if info is None else info.vmem_capacity_bytes * 3 // 4
  return min(cap, round_up(2 * working_set, 2**20))


def compiler_params(dimension_semantics: tuple[str, ...], vmem_limit_bytes: int | None = None):
  """pltpu.CompilerParams with the grid's dimension semantics and, when given, a scoped VMEM limit."""
  kwargs = {} if vmem_limit_bytes is None else {"vmem_limit_bytes": int(vmem_limit_bytes)}
  return pltpu.CompilerParams(dimension_semantics=dimension_semantics, **kwargs)


def interpret_mode(interpret: bool) -> bool:
  """The `interpret` argument of pl.pallas_call: False (Mosaic) or True, Pallas's HLO interpreter. Not the TPU
  interpreter (pltpu.InterpretParams): its callbacks are effects, which a `lax.platform_dependent` branch may not
  have, and it does not run DMAs through bitcast HBM references (sparse_matvec's 16-bit path)."""
  return bool(interpret)
