"""The sparse matvec as a Mosaic TPU kernel: a row gather by DMA, driven by scalar-prefetched indices.

Grid (B, N / bn, K / bk). At step (b, j, c) the kernel starts bk DMAs, one per kept activation, each copying the
bn-wide column block j of W's selected row from HBM into a VMEM buffer; once they land it accumulates the values of
those activations times the buffer into the float32 output block (b, j), which stays resident over c. Only the kept
rows of W leave HBM. This is the block-sparse pattern of the Pallas TPU docs with a block of one row.

A DMA may start at any row of a 32-bit array, but the rows of a 16-bit array (bfloat16) are packed in pairs into
32-bit words in HBM (rows 2q and 2q + 1 share a word: the low and the high half), and Mosaic only copies whole
words. So for 16-bit W the kernel reads W through a uint32 view [D/2, N], copies the word row q = i // 2 holding
row i, views the buffer [bk, bn] uint32 as [2bk, bn] of W's dtype again (row 2r is the low half: row 2q, row 2r + 1
the high half: row 2q + 1), and multiplies it by values placed at 2r + (i mod 2), zeros at the neighbour. It reads
two rows per kept activation: a 16-bit W moves 2 x (kept fraction) of the dense matvec's bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch

# Preferred (block_k, block_n) per chip: v6e has twice v5p's VMEM per core; elsewhere tiles that fit every chip.
DEFAULTS_PER_CHIP = {"v5e": (128, 2048), "v5p": (128, 2048), "v6e": (256, 2048)}
DEFAULTS_ELSEWHERE = (128, 1024)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the sparse matvec: block_k kept activations (row DMAs) and block_n output columns per step.

  block_k is a multiple of 128 (the lanes of the values block), or the whole padded K (a multiple of 8) when K is
  smaller; block_n is a multiple of 128 dividing N, or N itself. vmem_limit_bytes: Mosaic's scoped VMEM limit.
  """

  block_k: int
  block_n: int
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    dispatch.check_block("BlockSizes", "block_k", self.block_k, multiple=8, why="the sublanes of the row buffer")
    dispatch.check_block("BlockSizes", "block_n", self.block_n, multiple=1, why="a tile size")

  def validate(self, k: int, n_out: int) -> None:
    """ValueError unless the tiles divide the padded K and N and respect the lane tiling of their blocks."""
    owner = "sparse_matvec BlockSizes"
    if self.block_k != k:
      dispatch.check_block(owner, "block_k", self.block_k, multiple=dispatch.LANES, why="the lane tile of values")
    if self.block_n != n_out:
      dispatch.check_block(owner, "block_n", self.block_n, multiple=dispatch.LANES, why="the lane tile")
    if k % self.block_k or n_out % self.block_n:
      raise ValueError(f"{owner} ({self.block_k}, {self.block_n}) must divide the padded K={k} and N={n_out}")

  @classmethod
  def get_default(cls, k: int, n_out: int, *, chip: str | None = None) -> "BlockSizes":
    """The chip's preferred tiles fitted to the problem: block_k = K rounded up to 8 when K is below it, block_n the
    largest multiple of 128 dividing N (or N)."""
    pref_k, pref_n = DEFAULTS_PER_CHIP.get(chip, DEFAULTS_ELSEWHERE)
    bk = min(pref_k, dispatch.round_up(k, 8))
    return cls(bk, dispatch.largest_block(n_out, pref_n) or n_out)


def padded_k(k: int, block_k: int) -> int:
  """K padded to a multiple of block_k (padding entries: value 0 at row 0)."""
  return dispatch.round_up(k, block_k)


def _kernel(indices_ref, values_ref, w_hbm, out_ref, rows_vmem, sem, *, bk: int, bn: int, pairs: bool):
  b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  source = w_hbm.bitcast(jnp.uint32) if pairs else w_hbm  # [D/2, N] words of two 16-bit rows, or W itself

  @pl.when(c == 0)
  def _zero():
    out_ref[...] = jnp.zeros_like(out_ref)

  def row_copy(r):
    row = indices_ref[b, c * bk + r]  # a row of W, or of its word view (i // 2, computed by ops.py)
    return pltpu.make_async_copy(source.at[pl.ds(row, 1), pl.ds(j * bn, bn)], rows_vmem.at[pl.ds(r, 1)], sem)

  lax.fori_loop(0, bk, lambda r, _: row_copy(r).start(), None)
  lax.fori_loop(0, bk, lambda r, _: row_copy(r).wait(), None)
  rows = pltpu.bitcast(rows_vmem[...], values_ref.dtype) if pairs else rows_vmem[...]  # [2bk or bk, bn]
  out_ref[...] += jnp.dot(values_ref[...], rows, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def sparse_matvec_pallas(values_bk: jax.Array, rows_bk: jax.Array, w_dn: jax.Array, *, block_sizes: BlockSizes,
                         interpret: bool = False) -> jax.Array:
  """float32 [B, N] = Σ_j values[b, j] · W[row j] for W [D, N] of 32 or 16 bits, with K a multiple of block_k.

  32-bit W: values_bk [B, K] in W's dtype and rows_bk [B, K] the rows of W. 16-bit W (D even): rows_bk holds the
  word rows i // 2 and values_bk is [B, 2K], value j at 2j + (i mod 2) and 0 at 2j + 1 - (i mod 2) (ops.py builds
  both). Pad with value 0 at any valid row.
  """
  b, k = rows_bk.shape
  d, n_out = w_dn.shape
  itemsize = jnp.dtype(w_dn.dtype).itemsize
  if itemsize not in (2, 4):
    raise ValueError(f"W must have a 32- or 16-bit dtype, got {w_dn.dtype}")
  pairs = itemsize == 2
  if pairs and d % 2:
    raise ValueError(f"a 16-bit W needs an even number of rows D (rows are copied in pairs), got D={d}")
  bk, bn = block_sizes.block_k, block_sizes.block_n
  block_sizes.validate(k, n_out)
  span = 2 * bk if pairs else bk
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, n_out // bn, k // bk),
      in_specs=[pl.BlockSpec((None, 1, span), lambda i, j, c, idx: (i, 0, c)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((None, 1, bn), lambda i, j, c, idx: (i, 0, j)),
      scratch_shapes=[pltpu.VMEM((bk, bn), jnp.uint32 if pairs else w_dn.dtype), pltpu.SemaphoreType.DMA],
  )
  out = pl.pallas_call(
      functools.partial(_kernel, bk=bk, bn=bn, pairs=pairs),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, 1, n_out), jnp.float32),
      compiler_params=dispatch.compiler_params(("parallel", "parallel", "arbitrary"), block_sizes.vmem_limit_bytes),
      interpret=dispatch.interpret_mode(interpret),
  )(rows_bk.astype(jnp.int32), values_bk.astype(w_dn.dtype)[:, None, :], w_dn)
  return out[:, 0, :]
