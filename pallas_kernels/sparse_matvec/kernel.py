"""The sparse matvec as a Mosaic TPU kernel: a row gather by DMA, driven by scalar-prefetched indices.

Grid (B, N / bn, K / bk). At step (b, j, c) the kernel starts bk DMAs, one per kept activation, each copying the
bn-wide column block j of W's selected row from HBM into a [bk, bn] VMEM buffer; once they land it accumulates
values[b, c·bk : (c+1)·bk] · buffer into the float32 output block (b, j), which stays resident over c. Only the kept
rows of W ever leave HBM: the memory traffic is (kept fraction) × the dense matvec's. This is the block-sparse
pattern of the Pallas TPU docs with a block of one row.

On other platforms it runs in TPU interpret mode (tests on the CPU); GPUs use the XLA path (see ops.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def _kernel(indices_ref, values_ref, w_hbm, out_ref, rows_vmem, sem, *, bk: int, bn: int):
  b, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(c == 0)
  def _zero():
    out_ref[...] = jnp.zeros_like(out_ref)

  def row_copy(r):
    row = indices_ref[b, c * bk + r]
    return pltpu.make_async_copy(w_hbm.at[pl.ds(row, 1), pl.ds(j * bn, bn)], rows_vmem.at[pl.ds(r, 1)], sem)

  lax.fori_loop(0, bk, lambda r, _: row_copy(r).start(), None)
  lax.fori_loop(0, bk, lambda r, _: row_copy(r).wait(), None)
  out_ref[...] += jnp.dot(values_ref[...].astype(rows_vmem.dtype), rows_vmem[...],
                          preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("bk", "bn", "interpret"))
def sparse_matvec_pallas(values_bk: jax.Array, indices_bk: jax.Array, w_dn: jax.Array, *, bk: int, bn: int,
                         interpret: bool = False) -> jax.Array:
  """values_bk, indices_bk: [B, K] with K a multiple of bk (pad with value 0 at any valid index); w_dn: [D, N]
  with N a multiple of bn. Returns float32 [B, N]."""
  b, k = values_bk.shape
  n = w_dn.shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, n // bn, k // bk),
      in_specs=[pl.BlockSpec((None, 1, bk), lambda i, j, c, idx: (i, 0, c)),
                pl.BlockSpec(memory_space=pl.MemorySpace.ANY)],
      out_specs=pl.BlockSpec((None, 1, bn), lambda i, j, c, idx: (i, 0, j)),
      scratch_shapes=[pltpu.VMEM((bk, bn), w_dn.dtype), pltpu.SemaphoreType.DMA],
  )
  out = pl.pallas_call(
      functools.partial(_kernel, bk=bk, bn=bn),
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((b, 1, n), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(indices_bk.astype(jnp.int32), values_bk[:, None, :], w_dn)
  return out[:, 0, :]
