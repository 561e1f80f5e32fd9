"""The sparse matvec as a Mosaic GPU kernel (H100/H200): a row gather by TMA, one row segment per copy.

y[b, :] = Σ_k values[b, k] · W[indices[b, k], :] (method.md §1, the projection of a top-K sparsified input, Eq. 2).

Grid (N / bn, B, S), one warpgroup per CUDA block. Block (j, b, s) owns output columns j·bn .. (j+1)·bn of batch row
b and the s-th of S equal spans of that row's kept entries (K padded with value 0 at row 0). It walks its span in
chunks of bk kept entries: for each entry one TMA copies the bn-wide segment of W's selected row from GMEM into a
[bk, bn] SMEM slot (bk copies share one barrier), two slots alternating, so chunk c + 1 is in flight while the
warpgroup accumulates chunk c in float32 registers: acc[bn] += v_k · row_k. Only the kept rows of W leave GMEM. The
S partial sums [S, B, N] are added by XLA outside the kernel (S splits the kept rows so that batch 1 still fills the
GPU's 132 SMs: N / bn x B blocks alone are 16 for N = 4096). H100 has no TMA gather (that is sm_100), hence a copy
per row.

Verified without a GPU: compiles for H100 and H200 (tests/test_gpu_kernels.py); its numbers in Mosaic GPU interpret
mode on the CPU, which simulates the TMA copies, barriers and SMEM (tests/test_kernel_sparse_matvec.py).
Verified only on a device (scripts/bench_gpu.sh, then pallas_kernels/gpu_verified.py): the real TMA engine, the
ordering of the warpgroup's SMEM reads against the next TMA writes into the same slot (Pallas's automatic warpgroup
barrier before each copy), and the speed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import dispatch

SMS = 132  # streaming multiprocessors of an H100 SXM and an H200
TARGET_BLOCKS = 2 * SMS  # blocks the grid aims for: two per SM
GRID_NAMES = ("columns", "rows", "splits")  # the CUDA grid (N / bn, B, S)
SLOTS = 2  # SMEM buffers of bk rows each (double buffering)
MAX_COPY_DIM = 256  # a TMA copies at most 256 elements along each dimension
WARPGROUP_BYTES = 128  # a copy must move a multiple of 128 bytes (one arrival per thread of the warpgroup)


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
  """Tiles of the GPU kernel: block_k kept entries (row copies) per chunk, block_n output columns per CUDA block,
  splits S of each row's kept entries over CUDA blocks (None: enough for TARGET_BLOCKS)."""

  block_k: int = 32
  block_n: int = 256
  splits: int | None = None

  def __post_init__(self):
    dispatch.check_block("GpuBlockSizes", "block_k", self.block_k, multiple=32, why="whole 128-byte span copies")
    dispatch.check_block("GpuBlockSizes", "block_n", self.block_n, multiple=128, why="one strided layout per warpgroup")
    if self.block_k > MAX_COPY_DIM or self.block_n > MAX_COPY_DIM:
      raise ValueError(f"GpuBlockSizes ({self.block_k}, {self.block_n}): a TMA copies at most {MAX_COPY_DIM} elements "
                       "along each dimension")

  def plan(self, b: int, k: int, n_out: int) -> tuple[int, int]:
    """(splits S, chunks per split) for B rows of K kept entries and N columns; ValueError if bn does not divide N."""
    if n_out % self.block_n:
      raise ValueError(f"sparse_matvec GpuBlockSizes.block_n={self.block_n} must divide N={n_out}")
    chunks = -(-k // self.block_k)
    splits = self.splits or max(1, -(-TARGET_BLOCKS // (n_out // self.block_n * b)))
    splits = min(max(splits, -(-chunks // MAX_COPY_DIM)), chunks)  # a span of chunks x bk is copied by one TMA
    return splits, -(-chunks // splits)


def padded_k(b: int, k: int, n_out: int, block_sizes: GpuBlockSizes) -> int:
  """K padded to S x chunks x block_k (padding entries: value 0 at row 0)."""
  splits, chunks = block_sizes.plan(b, k, n_out)
  return splits * chunks * block_sizes.block_k


def _kernel(values_gmem, rows_gmem, w_gmem, out_gmem, *, bk: int, bn: int, chunks: int):
  """The kernel with its SMEM and barriers allocated in scope (Mosaic GPU interpret mode allocates barriers only
  there, not as pallas_call scratch)."""
  pl.run_scoped(functools.partial(_body, values_gmem, rows_gmem, w_gmem, out_gmem, bk=bk, bn=bn, chunks=chunks),
                plgpu.SMEM((chunks, bk), jnp.float32), plgpu.SMEM((chunks, bk), jnp.int32),
                plgpu.SMEM((SLOTS, bk, bn), w_gmem.dtype), plgpu.SMEM((bn,), jnp.float32),
                plgpu.Barrier(num_arrivals=bk, num_barriers=SLOTS), plgpu.Barrier(num_arrivals=2))


def _body(values_gmem, rows_gmem, w_gmem, out_gmem, values_smem, rows_smem, buf, out_smem, barriers, span_barrier,
          *, bk: int, bn: int, chunks: int):
  """values_gmem (float32, rounded to W's dtype) and rows_gmem [B, S, chunks, bk]; w_gmem [D, N]; out_gmem [S, B, N]
  float32. Scratch: this block's span of values and rows [chunks, bk] and its output [bn] in SMEM, the row buffer
  [SLOTS, bk, bn] in W's dtype, a barrier per slot (bk copies arrive on each) and one for the span."""
  j, b, s = (lax.axis_index(name) for name in GRID_NAMES)  # interpret mode gives every pl.program_id 0
  col = j * bn
  plgpu.copy_gmem_to_smem(values_gmem.at[b, s], values_smem, span_barrier)
  plgpu.copy_gmem_to_smem(rows_gmem.at[b, s], rows_smem, span_barrier)
  plgpu.barrier_wait(span_barrier)

  def start(c, slot):
    for r in range(bk):
      row = rows_smem[c, r]
      plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(row, 1), pl.ds(col, bn)], buf.at[slot, pl.ds(r, 1)],
                              barriers.at[slot])

  start(0, 0)

  def chunk(c, acc):
    slot = c % SLOTS

    @pl.when(c + 1 < chunks)
    def _prefetch():
      start(c + 1, 1 - slot)

    plgpu.barrier_wait(barriers.at[slot])
    for r in range(bk):
      acc = acc + values_smem[c, r] * buf[slot, r].astype(jnp.float32)
    return acc

  # The accumulator starts as zeros read back from SMEM: an array of the loop's carry layout (strided, as the row
  # loads; a splat of zeros would not match, and interpret mode has no layout_cast). With 128 <= bn <= 256 columns
  # the float32 [bn] and W's dtype [bn] get the same strided layout, bn / 128 elements per thread.
  out_smem[...] = jnp.zeros((bn,), jnp.float32)
  out_smem[...] = lax.fori_loop(0, chunks, chunk, out_smem[...])
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[s, b, pl.ds(col, bn)])
  plgpu.wait_smem_to_gmem(0)



def interpret_params(**kwargs):
  """Mosaic GPU interpret mode's parameters (jax 0.10 exports them nowhere public): the `interpret` argument that
  runs this kernel on the CPU, simulating GMEM, SMEM, the TMA copies and barriers; kwargs e.g. detect_races=True."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=import-outside-toplevel
  return InterpretGPUParams(**kwargs)


def races_found() -> bool:
  """Whether the last kernel interpreted with detect_races=True raced (a read or write of SMEM or GMEM unordered
  with another by the barriers and copies)."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # pylint: disable=import-outside-toplevel
  return gpu_callbacks.get_races().races_found


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def sparse_matvec_gpu(values_bk: jax.Array, indices_bk: jax.Array, w_dn: jax.Array, *,
                      block_sizes: GpuBlockSizes = GpuBlockSizes(), interpret=False) -> jax.Array:
  """float32 [B, N] = Σ_k values[b, k] · W[indices[b, k]] for W [D, N] float32 or bfloat16 (values in any float
  dtype, cast to W's). interpret: False (Mosaic GPU) or a Mosaic GPU InterpretGPUParams (the CPU simulation)."""
  b, k = indices_bk.shape
  n_out = w_dn.shape[1]
  bk, bn = block_sizes.block_k, block_sizes.block_n
  if (bn * jnp.dtype(w_dn.dtype).itemsize) % WARPGROUP_BYTES:
    raise ValueError(f"block_n={bn} of {w_dn.dtype} is not a multiple of {WARPGROUP_BYTES} bytes")
  splits, chunks = block_sizes.plan(b, k, n_out)
  pad = ((0, 0), (0, splits * chunks * bk - k))
  values_bscr = jnp.pad(values_bk.astype(w_dn.dtype).astype(jnp.float32), pad).reshape(b, splits, chunks, bk)
  rows_bscr = jnp.pad(indices_bk.astype(jnp.int32), pad).reshape(b, splits, chunks, bk)
  out_sbn = plgpu.kernel(
      functools.partial(_kernel, bk=bk, bn=bn, chunks=chunks),
      out_type=jax.ShapeDtypeStruct((splits, b, n_out), jnp.float32),
      grid=(n_out // bn, b, splits), grid_names=GRID_NAMES,
      interpret=interpret,
  )(values_bscr, rows_bscr, w_dn)
  return out_sbn.sum(axis=0)
