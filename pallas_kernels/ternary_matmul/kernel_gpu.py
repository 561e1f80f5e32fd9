"""int8 × packed-ternary matmul as a Mosaic GPU kernel (H100/H200) for decode (T = 1-16) and prefill tiles.

Same packing and inputs as kernel.py (TPU): packed uint8 [Q, N], byte [q, n] holding ternary codes of rows q, q + Q,
q + 2Q, q + 3Q in bit pairs 0-1, 2-3, 4-5, 6-7 (0 → 0, 1 → +1, 2 → −1); activations as code planes int8 [4, T, Q]
(kernel.code_planes); y = acc · w_scale / act_scale with acc the exact int32 sum (../shared/docs/method.md §4).

One warpgroup (128 threads) per program; grid (T / bt, split_q · N / bn, Q / (split_q · bq)), the last axis
sequential: Pallas's Mosaic GPU pipeline copies each [bq, bn] block of packed weights and [4, bt, bq] block of planes
into shared memory by TMA (max_concurrent_steps deep). The body walks the bq packed rows: it loads a row [bn] of bytes
into registers, unpacks each bit pair p into codes c = (b >> 2p & 1) − (b >> 2p+1 & 1) ∈ {−1, 0, 1} and adds
x[p, t, r] · c into token t's int32 row (x a scalar read from shared memory, broadcast over the row): CUDA cores, no
tensor cores, no unpacked weight matrix anywhere. The bt int32 rows live in registers over a block and in a
shared-memory scratch across blocks; the last block scales them to float32, or, split over Q (split_q > 1, decode
grids too short for the 132 SMs), writes its int32 partial, which XLA sums (exact) and scales after the kernel. The
weights cross HBM at 2 bits each, once per block of bt rows; at T = 16 the 64 multiply-adds per packed byte may make
it ALU-bound instead (unmeasured).

Verified without a GPU (tests/test_kernel_ternary_matmul_gpu.py, tests/test_gpu_kernels.py): the body against
reference.py in Pallas's HLO interpreter (interpret=True) on CPU, bit-equal, with padded rows, split_q partials and
several row, column and Q blocks; the whole call compiled deviceless for H100 and H200 (Mosaic GPU's own checks ran:
register layouts, TMA box limits, copy sizes, shared memory; an oversized block is refused) with its mosaic_gpu
custom call in the HLO, directly and through ops.ternary_matmul(backend="pallas"). Mosaic GPU's own interpreter
(InterpretGPUParams) cannot run it in jax 0.10.2: it takes only whole-array blocks. Verified only on a device: the
TMA copies and the pipeline's barriers around the Q loop, the scalar global-memory read of the factors, the strided
register layouts at run time, bank conflicts, and every timing (no GPU lent yet).
Open: block sizes and split_q tuned on a device; dp4a, or WGMMA (s8 × s8 → s32) for prefill tiles, which now re-read
the weights once per 16 rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ternary_matmul.kernel import code_planes

THREADS = 128  # one warpgroup per program
TMA_MIN_BYTES = 16  # the minor dimension of a TMA box spans at least 16 bytes
TMA_MAX_BOX = 256  # and at most 256 elements along any dimension (Mosaic GPU refuses larger copies)
COPY_MULTIPLE = THREADS  # Pallas's copies move a multiple of 128 bytes (one per thread of the warpgroup)
SMS = 132  # streaming multiprocessors of an H100 SXM and of an H200


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
  """Blocks of the Mosaic GPU kernel.

  block_t token rows (at most 64: one int32 row of block_n per token lives in registers; 4 · block_t · block_q a
  multiple of 128, the planes' copy); block_n output columns (128 or 256: a multiple of the warpgroup's 128 threads,
  at most the TMA box's 256); block_q packed rows per pipeline step (a multiple of 16, the TMA minimum for bytes, up
  to 256); split_q: programs sharing one output block, each summing Q / split_q packed rows into its own int32
  partial (summed exactly after the kernel), so short decode grids fill the SMs; max_concurrent_steps: the
  pipeline's depth over Q (2 double-buffers the copies).
  """

  block_t: int
  block_n: int
  block_q: int
  split_q: int = 1
  max_concurrent_steps: int = 2

  def __post_init__(self):
    for name, multiple, cap in (("block_t", 1, 64), ("block_n", THREADS, TMA_MAX_BOX),
                                ("block_q", TMA_MIN_BYTES, TMA_MAX_BOX), ("split_q", 1, None),
                                ("max_concurrent_steps", 1, None)):
      size = getattr(self, name)
      if not (isinstance(size, int) and size > 0 and size % multiple == 0 and (cap is None or size <= cap)):
        raise ValueError(f"GpuBlockSizes.{name} must be a positive multiple of {multiple}"
                         f"{f' up to {cap}' if cap else ''}, got {size!r}")

  def validate(self, t: int, q: int, n_out: int) -> None:
    """ValueError unless the blocks divide T (padded), Q (split_q · block_q) and N, and the planes' copy does."""
    if 4 * self.block_t * self.block_q % COPY_MULTIPLE:
      raise ValueError(f"ternary_matmul GpuBlockSizes: 4 · block_t · block_q = {4 * self.block_t * self.block_q} bytes "
                       f"of planes per copy must be a multiple of {COPY_MULTIPLE}")
    if t % self.block_t or n_out % self.block_n or q % (self.split_q * self.block_q):
      raise ValueError(f"ternary_matmul GpuBlockSizes ({self.block_t}, {self.block_n}, {self.block_q}, split_q "
                       f"{self.split_q}) must divide T={t} (pad the rows), N={n_out} and Q={q} (by split_q · block_q)")

  def smem_bytes(self) -> int:
    """Shared memory the blocks take: pipelined weights and planes, the 4-byte output block and int32 scratch."""
    per_step = self.block_q * self.block_n + 4 * self.block_t * self.block_q
    return self.max_concurrent_steps * per_step + 2 * 4 * self.block_t * self.block_n

  @classmethod
  def get_default(cls, t: int, q: int, n_out: int) -> GpuBlockSizes:
    """All of a decode batch in one block (T up to 16, no padded rows), 16 rows at a time for longer T; 128 columns;
    the smallest split_q of 1, 2, 4, 8 that gives every SM a program (7B decode: 4096 -> 11008 splits 2, 11008 -> 4096
    splits 4), block_q the largest multiple of 16 up to 256 dividing Q / split_q; a pipeline about 32 KiB of weights
    deep (2 to 8 steps, at most the steps there are). Unmeasured: chosen for occupancy and bytes in flight."""
    bt = min(16, max(t, 1))
    programs = -(-t // bt) * (n_out // THREADS) if n_out % THREADS == 0 else 1
    split, bq = 1, next((b for b in range(TMA_MAX_BOX, 0, -TMA_MIN_BYTES) if q % b == 0 and bt * b % 32 == 0), q)
    for s in (1, 2, 4, 8):
      b = next((b for b in range(TMA_MAX_BOX, 0, -TMA_MIN_BYTES) if q % (s * b) == 0 and bt * b % 32 == 0), None)
      if b is not None:
        split, bq = s, b
        if programs * s >= SMS:
          break
    steps = max(2, min(8, 32 * 1024 // (bq * THREADS), q // (split * bq)))
    return cls(bt, THREADS, bq, split, steps)


def _unpack(row_n: jax.Array, plane: int) -> jax.Array:
  """int32 codes {−1, 0, 1} [bn] of bit pair `plane` of int32 bytes [bn]: bit 0 minus bit 1 (0, 1, 2 → 0, 1, −1)."""
  return ((row_n >> (2 * plane)) & 1) - ((row_n >> (2 * plane + 1)) & 1)


def _kernel(planes_ref, w_ref, *refs, bt: int, bq: int, scaled: bool):
  """planes_ref int8 [4, bt, bq], w_ref uint8 [bq, bn]; refs: factor_ref float32 [T] (all rows, left in global
  memory; only when scaled), out_ref ([bt, bn] float32 when scaled, else [1, bt, bn] int32: this split's partial),
  written at the last Q step, and acc_ref int32 [bt, bn], the scratch kept across the Q steps."""
  factor_ref, out_ref, acc_ref = refs if scaled else (None, *refs)
  first_row, c = pl.program_id(0) * bt, pl.program_id(2)  # read outside pl.when: the HLO interpreter needs it

  @pl.when(c == 0)
  def _zero():
    for t in range(bt):
      acc_ref[t] = jnp.zeros(acc_ref.shape[1:], jnp.int32)

  def row(r, acc):
    packed = w_ref[r].astype(jnp.int32)
    acc = list(acc)
    for plane in range(4):
      codes = _unpack(packed, plane)
      for t in range(bt):
        acc[t] = acc[t] + planes_ref[plane, t, r].astype(jnp.int32) * codes
    return tuple(acc)

  acc = jax.lax.fori_loop(0, bq, row, tuple(acc_ref[t] for t in range(bt)))
  for t in range(bt):
    acc_ref[t] = acc[t]

  @pl.when(c == pl.num_programs(2) - 1)
  def _out():
    for t in range(bt):
      if scaled:
        out_ref[t] = acc_ref[t].astype(jnp.float32) * factor_ref[first_row + t]
      else:
        out_ref[0, t] = acc_ref[t]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def ternary_matmul_mosaic_gpu(planes_ptq: jax.Array, act_scale_t1: jax.Array, packed_qn: jax.Array,
                              w_scale: jax.Array, *, block_sizes: GpuBlockSizes | None = None,
                              interpret=False) -> jax.Array:
  """planes_ptq int8 [4, T, Q] (kernel.code_planes), act_scale float32 [T, 1], packed uint8 [Q, N], w_scale float32
  scalar; T a multiple of block_t (pad rows with codes 0 and scale 1: `matmul` does), N and Q of block_n and
  split_q · block_q. Returns float32 [T, N] = (codes · W_q) · (w_scale / act_scale), bit-equal to reference.py (with
  split_q > 1 the kernel's int32 partials [split_q, T, N] are summed and scaled by XLA after it). interpret: False
  (Mosaic GPU) or True (Pallas's HLO interpreter, on any platform)."""
  t = planes_ptq.shape[1]
  q, n = packed_qn.shape
  if block_sizes is None:
    block_sizes = GpuBlockSizes.get_default(t, q, n)
  block_sizes.validate(t, q, n)
  bt, bn, bq, split = block_sizes.block_t, block_sizes.block_n, block_sizes.block_q, block_sizes.split_q
  steps = q // (split * bq)  # pipeline steps per program
  # The reference's float32 factor per row, computed once here: w_scale / act_scale [T].
  factor_t = (jnp.asarray(w_scale, jnp.float32) / act_scale_t1.astype(jnp.float32)).reshape(t)
  scaled = split == 1
  # Grid axis 1 runs over (split, column block) pairs: Mosaic GPU takes at most 3 grid axes that are parallel with a
  # sequential one (jax 0.10.2).
  nb = n // bn
  in_specs = [pl.BlockSpec((4, bt, bq), lambda i, k, c: (0, i, k // nb * steps + c)),
              pl.BlockSpec((bq, bn), lambda i, k, c: (k // nb * steps + c, k % nb))]
  if scaled:
    out_spec, out_shape = pl.BlockSpec((bt, bn), lambda i, k, c: (i, k)), jax.ShapeDtypeStruct((t, n), jnp.float32)
  else:
    out_spec = pl.BlockSpec((1, bt, bn), lambda i, k, c: (k // nb, i, k % nb))
    out_shape = jax.ShapeDtypeStruct((split, t, n), jnp.int32)
  out = pl.pallas_call(
      functools.partial(_kernel, bt=bt, bq=bq, scaled=scaled),
      grid=(t // bt, split * nb, steps),
      in_specs=in_specs + [pl.BlockSpec(memory_space=plgpu.GMEM)] * scaled,
      out_specs=out_spec,
      out_shape=out_shape,
      scratch_shapes=[plgpu.SMEM((bt, bn), jnp.int32)],
      compiler_params=plgpu.CompilerParams(dimension_semantics=("parallel", "parallel", "sequential"),
                                           max_concurrent_steps=block_sizes.max_concurrent_steps),
      interpret=interpret,
  )(planes_ptq, packed_qn, *[factor_t] * scaled)
  return out if scaled else jnp.sum(out, axis=0).astype(jnp.float32) * factor_t[:, None]


def matmul(codes_td: jax.Array, scale_t1: jax.Array, packed_qn: jax.Array, w_scale: jax.Array, *,
           block_sizes: GpuBlockSizes | None = None, interpret=False) -> jax.Array:
  """ops.ternary_matmul's arguments flattened (codes int8 [T, D], scale float32 [T, 1], packed uint8 [D/4, N], w_scale
  scalar) through the kernel: rows padded to block_t (codes 0, scale 1, outputs dropped). float32 [T, N]."""
  t, (q, n_out) = codes_td.shape[0], packed_qn.shape
  block_sizes = block_sizes or GpuBlockSizes.get_default(t, q, n_out)
  pad = ((0, -(-t // block_sizes.block_t) * block_sizes.block_t - t), (0, 0))
  planes = code_planes(jnp.pad(codes_td, pad), q)
  y = ternary_matmul_mosaic_gpu(planes, jnp.pad(scale_t1, pad, constant_values=1.0), packed_qn, w_scale,
                                block_sizes=block_sizes, interpret=interpret)
  return y[:t]
