"""Top-K selection as a Pallas kernel: one block of rows per grid step, the whole row width in VMEM.

Per row it finds, without sorting, the K-th largest |x| and the last tie kept with the library's own search
(qsparse_jax.ops.selection.kth_thresholds: bit-by-bit bisection over float32 bit patterns, 15 steps for bfloat16
whose low 16 key bits are 0, then a bisection over positions), and keeps what `selection.keeps` keeps: the same
specification as qsparse_jax.topk_mask, in compares, selects and row sums only, which Mosaic TPU lowers.
Optionally it also writes each row's threshold (tau_key, last), from which the masked gradient rebuilds the exact
mask, or quantizes the kept values to int8 with the row's absmax scale in the same pass (method.md §4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from qsparse_jax.ops.selection import keeps, kth_thresholds, magnitude_key, zero_key_bits

EPS = 1e-5  # qsparse_jax.ops.sparsity.EPS
QP = 127.0
ROWS_PER_CHIP = {"v5e": 16, "v5p": 16, "v6e": 32}  # rows per step where the chip is known; 8 otherwise


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the top-K kernel: block_rows rows of the whole width D per grid step.

  block_rows must be a multiple of the sublane tile of every block's dtype: 8 for float32, 16 for bfloat16, 32 for
  the int8 codes of topk_sparsify_int8. vmem_limit_bytes: Mosaic's scoped VMEM limit (None: its default).
  """

  block_rows: int
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    dispatch.check_block("BlockSizes", "block_rows", self.block_rows, multiple=1, why="rows per grid step")

  def validate(self, dtype, *, int8: bool = False) -> None:
    """ValueError unless block_rows respects the TPU tiling of the blocks it cuts (x of dtype; int8 codes)."""
    tile = max(dispatch.sublane_tile(dtype), dispatch.sublane_tile(jnp.int8) if int8 else 1)
    dispatch.check_block("topk BlockSizes", "block_rows", self.block_rows, multiple=tile,
                         why=f"the sublane tile of {jnp.dtype(dtype).name}{' and int8' if int8 else ''} blocks")

  @classmethod
  def get_default(cls, dtype, d: int, *, int8: bool = False, chip: str | None = None) -> "BlockSizes":
    """Rows per step for the chip being compiled for (dispatch.chip_name()), rounded up to the dtypes' tile, and a
    VMEM limit above the working set (about eight [rows, D] 32-bit arrays) when Mosaic's default may be short."""
    tile = max(dispatch.sublane_tile(dtype), dispatch.sublane_tile(jnp.int8) if int8 else 1)
    rows = dispatch.round_up(ROWS_PER_CHIP.get(chip, 8), tile)
    working_set = rows * d * (2 * jnp.dtype(dtype).itemsize + 2 * (1 if int8 else jnp.dtype(dtype).itemsize) + 32)
    return cls(rows, vmem_limit_bytes=dispatch.vmem_limit(working_set))


def _mask(x, k: int):
  """keeps() of the exact top-k of each row of x [R, D] and the thresholds: (mask, tau_key [R, 1], last [R, 1])."""
  key = magnitude_key(x)
  tau_key, last = kth_thresholds(key, k, zero_bits=zero_key_bits(x.dtype))
  return keeps(key, lax.broadcasted_iota(jnp.int32, key.shape, 1), tau_key, last), tau_key, last


def _sparsify_kernel(x_ref, out_ref, *threshold_refs, k: int):
  x = x_ref[...]
  mask, tau_key, last = _mask(x, k)
  out_ref[...] = jnp.where(mask, x, jnp.zeros_like(x))
  if threshold_refs:
    tau_ref, last_ref = threshold_refs
    tau_ref[...] = tau_key
    last_ref[...] = last


def _int8_kernel(x_ref, codes_ref, scale_ref, *, k: int):
  x = x_ref[...]
  x32 = x.astype(jnp.float32)
  scale = QP / (jnp.max(jnp.abs(x32), axis=1, keepdims=True) + EPS)
  codes = jnp.clip(jnp.round(x32 * scale), -QP - 1.0, QP)
  codes_ref[...] = jnp.where(_mask(x, k)[0], codes, 0.0).astype(jnp.int32).astype(jnp.int8)
  scale_ref[...] = scale


@functools.partial(jax.jit, static_argnames=("k", "block_sizes", "int8", "thresholds", "interpret"))
def topk_pallas(x_td: jax.Array, *, k: int, block_sizes: BlockSizes, int8: bool = False, thresholds: bool = False,
                interpret: bool = False):
  """x_td: [T, D] with T a multiple of block_sizes.block_rows.

  Returns x ⊙ Topk(|x|) [T, D] in x's dtype; with thresholds, also (tau_key, last) int32 [T, 1] each, for
  selection.keeps; with int8, (codes int8 [T, D], scale float32 [T, 1]) instead.
  """
  t, d = x_td.shape
  bt = block_sizes.block_rows
  block_sizes.validate(x_td.dtype, int8=int8)
  if t % bt:
    raise ValueError(f"T={t} must be a multiple of block_rows={bt} (pad the rows)")
  rows = pl.BlockSpec((bt, d), lambda i: (i, 0))
  per_row = pl.BlockSpec((bt, 1), lambda i: (i, 0))
  if int8:
    kernel = functools.partial(_int8_kernel, k=k)
    out_shape = (jax.ShapeDtypeStruct((t, d), jnp.int8), jax.ShapeDtypeStruct((t, 1), jnp.float32))
    out_specs = (rows, per_row)
  elif thresholds:
    kernel = functools.partial(_sparsify_kernel, k=k)
    out_shape = (jax.ShapeDtypeStruct((t, d), x_td.dtype), jax.ShapeDtypeStruct((t, 1), jnp.int32),
                 jax.ShapeDtypeStruct((t, 1), jnp.int32))
    out_specs = (rows, per_row, per_row)
  else:
    kernel = functools.partial(_sparsify_kernel, k=k)
    out_shape, out_specs = jax.ShapeDtypeStruct((t, d), x_td.dtype), rows
  return pl.pallas_call(
      kernel, grid=(t // bt,), in_specs=[rows], out_specs=out_specs, out_shape=out_shape,
      compiler_params=dispatch.compiler_params(("parallel",), block_sizes.vmem_limit_bytes),
      interpret=dispatch.interpret_mode(interpret),
  )(x_td)
