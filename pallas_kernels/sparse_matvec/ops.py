"""Public entry: sparse_matvec(values, indices, W) and the (values, indices) form of a top-K sparsified input.

Backends (pallas_kernels.dispatch.select): on a TPU the Mosaic row-gather kernel (kernel.py) for the inputs
`kernel_supported` accepts (or backend="pallas"); on an H100/H200 the Mosaic GPU kernel (kernel_gpu.py) with
backend="pallas", or "auto" once pallas_kernels/gpu_verified.py records it for that GPU (`gpu_kernel_supported`
inputs); elsewhere plain JAX. On the CPU the XLA path is a fast path of its own: a scan over chunks of kept
activations whose body is one fused loop per W, y += Σ_j v_j · W[i_j, :], so each selected row streams through the
cache once with no gathered copy (`jnp.take` of the rows and then a dot writes and re-reads them, and is slower than
the dense matvec), and whose steps are large enough for XLA to share each among the CPU's threads. That path
also reads packed ternary weights (uint8 [D/4, N], pallas_kernels.ternary_matmul.pack_ternary), decoding the 2-bit
codes of the rows it reads: the decode step of a packed 1.58-bit model reads a sixteenth of the float32 bytes of
its kept rows. Above batch 1, where the rows of x together keep most rows of W, it may read a float32 W whole instead
(dense_read), as cpu_reads decides.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import dispatch
from pallas_kernels.sparse_matvec import cpu_reads
from pallas_kernels.sparse_matvec.kernel import BlockSizes, padded_k, sparse_matvec_pallas
from pallas_kernels.sparse_matvec.kernel_gpu import GpuBlockSizes, sparse_matvec_gpu
from pallas_kernels.ternary_matmul.kernel import unpack_plane
from qsparse_jax.ops.selection import mask_from_thresholds, row_thresholds
from qsparse_jax.ops.sparsity import ternary_codes

PALLAS_PLATFORMS = ("tpu",)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
MAX_PREFETCH_INDICES = 128 * 1024  # B x K row indices live in SMEM (1 MiB per core on v5p and v6e)
# The CPU path's loop reads CPU_ROWS_PER_STEP kept rows of each W per step (over the B rows of x), or more where
# rows are narrow: XLA's CPU backend splits a loop step among threads only when the step's fusion reads at least
# XLA_CPU_BYTES_PER_THREAD per thread (a memory-bound fusion: xla/service/cpu/parallel_task_assignment.cc, at most
# ceil(sqrt(CPUs)) threads), and a step below that runs on one core, at half the memory bandwidth of two. A step's
# partial sums [B, G, N] (G groups of each row's entries) are one fusion per W that XLA splits among threads: each
# row of x adds G gathered rows (W.at[i_G].get()) g times, and the B rows are stacked, a concatenate that XLA:CPU
# fuses only up to MAX_PARTS parts (with more, each part became a fusion of its own, run on one thread), so larger
# batches run in blocks of MAX_PARTS rows. Batch 1 sums BATCH1_GROUPS groups of 12 rows; a batch of B sums
# MAX_PARTS / B groups per row (batch 8: one group of 24, read with a dynamic slice), the layout that measured best.
# Each step also costs a fixed overhead (about 15 µs: the loop's thunks and the threads' hand-off), so steps of 192
# rows beat 64-80. Measured at 40% kept on the Intel Xeon, in a loop over layers (docs/benchmarks.md), against the
# dense matvec: TinyLlama's q at batch 1 1.61x with 192 rows a step, 1.37x with 80 and 1.43x with 416 (8 groups
# stacked, the previous layout); gathers of 16 groups of 12 rows ran down (5632 -> 2048) at 2.27x against 2.02x
# and k|v at 1.12x against 0.95x, and compile a site about 10x faster; at batch 8 gathers of 2 groups ran gate|up
# at 1.33x against 1.67x for one group of 24 rows per row.
CPU_ROWS_PER_STEP = 192
MAX_PARTS = 8
BATCH1_GROUPS = 16
SMALL_CALL_ROWS = 8
MAX_ROWS_PER_STEP = 256
XLA_CPU_BYTES_PER_THREAD = 256 * 1024
# The XLA path compiled for a GPU or TPU (no kernel for the shape or program) takes DEVICE_ROWS_PER_STEP kept entries
# per row of x a step in one group: the CPU's 8 groups of partial sums [8, B, N], carried through the loop on a
# device, moved 1.9x the bytes (tests/test_compile_gpu.py), and there is no thread split to feed.
DEVICE_ROWS_PER_STEP = 16


def kernel_supported(values_shape: tuple[int, ...], w_shape: tuple[int, ...], w_dtype) -> bool:
  """Whether "auto" runs the kernel on a TPU: W float32 or bfloat16 with N a multiple of 128 (and D even for
  bfloat16, whose rows are copied in pairs), and B x K indices that fit in SMEM (compiled for v5p and v6e at decode
  shapes in tests/test_tpu_compile.py)."""
  b, k = values_shape
  d, n_out = w_shape
  dtype = jnp.dtype(w_dtype)
  return (dtype in map(jnp.dtype, KERNEL_DTYPES) and n_out % dispatch.LANES == 0
          and (dtype.itemsize == 4 or d % 2 == 0) and b * padded_k(k, dispatch.LANES) <= MAX_PREFETCH_INDICES)


def gpu_block_sizes(n_out: int) -> GpuBlockSizes | None:
  """The GPU kernel's tiles for N columns: 256 columns per CUDA block, or 128 (None when 128 does not divide N)."""
  block_n = dispatch.largest_block(n_out, 256)
  return None if block_n is None else GpuBlockSizes(block_n=block_n)


def gpu_kernel_supported(w_shape: tuple[int, ...], w_dtype) -> bool:
  """Whether the GPU kernel takes W: float32 or bfloat16 with N a multiple of 128 (compiled for H100 and H200 at 7B
  decode shapes, batch 1 to 16, in tests/test_gpu_kernels.py)."""
  return jnp.dtype(w_dtype) in map(jnp.dtype, KERNEL_DTYPES) and gpu_block_sizes(w_shape[1]) is not None


def _gpu_matvecs(values_bk, indices_bk, ws_dn) -> tuple:
  """float32 [B, N_w] per W from the Mosaic GPU kernel (kernel_gpu.py)."""
  return tuple(sparse_matvec_gpu(values_bk, indices_bk, w_dn, block_sizes=gpu_block_sizes(w_dn.shape[1]))
               for w_dn in ws_dn)


def _running_count(mask_bd: jax.Array, block: int = 64) -> jax.Array:
  """Inclusive running count of True along each row, [B, D] int32: within blocks of `block` entries a product with
  an upper-triangular matrix of ones, then the block offsets the same way (0/1 sums below 2**24 are exact in float32;
  on the CPU this is several times faster than jnp.cumsum, which XLA lowers to a log-depth scan)."""
  b, d = mask_bd.shape
  m_bnj = jnp.pad(mask_bd.astype(jnp.float32), ((0, 0), (0, (-d) % block))).reshape(b, -1, block)
  within_bnj = jnp.einsum("bni,ij->bnj", m_bnj, jnp.triu(jnp.ones((block, block), jnp.float32)),
                          precision=lax.Precision.HIGHEST)
  nb = m_bnj.shape[1]
  offsets_bn = jnp.einsum("bm,mn->bn", within_bnj[:, :, -1], jnp.triu(jnp.ones((nb, nb), jnp.float32), 1),
                          precision=lax.Precision.HIGHEST)
  return (within_bnj + offsets_bn[:, :, None]).reshape(b, -1)[:, :d].astype(jnp.int32)


def kept_indices(mask_bd: jax.Array, k: int) -> jax.Array:
  """The positions of the True entries of each row, ascending, [B, k] int32 (rows hold exactly k of them)."""
  b, d = mask_bd.shape
  slot_bd = jnp.where(mask_bd, _running_count(mask_bd) - 1, k)  # unkept entries go to slot k, dropped
  rows_bd = lax.broadcasted_iota(jnp.int32, (b, d), 0)
  positions_bd = lax.broadcasted_iota(jnp.int32, (b, d), 1)
  return jnp.zeros((b, k), jnp.int32).at[rows_bd, slot_bd].set(positions_bd, mode="drop")


def topk_entries(x_bd: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The K largest-|x| entries of each row as (values [B, K], indices [B, K] ascending, mask M [B, D]): Topk(|x|) of
  method.md Eq. 2 in gathered form and as the mask (exact, ties to the lower index, as qsparse_jax.topk_mask)."""
  if x_bd.ndim != 2 or not 0 < k <= x_bd.shape[1]:
    raise ValueError(f"expected x [B, D] and 0 < k <= D, got shape {x_bd.shape} and k={k}")
  mask_bd = mask_from_thresholds(x_bd, *row_thresholds(x_bd, k))
  indices_bk = kept_indices(mask_bd, k)
  return jnp.take_along_axis(x_bd, indices_bk, axis=1), indices_bk, mask_bd


def topk_values_indices(x_bd: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(values [B, K], indices [B, K]) of topk_entries."""
  values_bk, indices_bk, _ = topk_entries(x_bd, k)
  return values_bk, indices_bk


def _check(values_bk, indices_bk, w_dn):
  if values_bk.ndim != 2 or values_bk.shape != indices_bk.shape:
    raise ValueError(f"values and indices must both be [B, K], got {values_bk.shape} and {indices_bk.shape}")
  if not jnp.issubdtype(indices_bk.dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got {indices_bk.dtype}")
  if w_dn.ndim != 2:
    raise ValueError(f"W must be [D, N], got shape {w_dn.shape}")


def input_size(w: jax.Array) -> int:
  """D of a weight matrix as sparse_matvecs reads it: its rows, or 4 per byte row of packed ternary codes (uint8)."""
  return 4 * w.shape[0] if is_packed(w) else w.shape[0]


def is_packed(w: jax.Array) -> bool:
  """Whether W is packed ternary codes (uint8 [D/4, N], pack_ternary's layout) rather than weights."""
  return jnp.dtype(w.dtype) == jnp.dtype(jnp.uint8)


def _ternary_rows(rows, scale):
  """Rows of W as ternarize(W) has them, from the whole tensor's absmean scale α + ε (method.md §4)."""
  return ternary_codes(rows, scale) * scale


def memory_bound_threads() -> int:
  """How many threads XLA's CPU backend gives a memory-bound loop fusion: ceil(sqrt(CPUs this process may use))."""
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return math.isqrt(cpus - 1) + 1


def is_small_call(batch: int, k: int, row_bytes: int) -> bool:
  """Whether B rows of x with k kept entries each read fewer bytes of W rows (row_bytes each) than all threads' share
  of one loop step: a call no step of which XLA would split among threads (a small model's)."""
  return batch * k * row_bytes < memory_bound_threads() * XLA_CPU_BYTES_PER_THREAD


def cpu_loop_plan(batch: int, k: int, row_bytes: int) -> tuple[int, int]:
  """(groups, group) for the CPU path: each step reads groups x group of the k kept entries of each of the B <=
  MAX_PARTS rows of x, from W rows of row_bytes bytes (the widest W of the call). A step reads CPU_ROWS_PER_STEP
  rows over the batch, or enough for every thread a memory-bound fusion gets (XLA_CPU_BYTES_PER_THREAD each, with a
  quarter to spare), at most MAX_ROWS_PER_STEP and at most k per batch row. Batch 1 reads BATCH1_GROUPS groups
  (16 gathered rows at a time, 12 times), a batch of B MAX_PARTS / B groups per row (batch 8: one group of 24 per
  row). A call whose kept rows are fewer bytes than all threads' share of one step (a small model's) runs in steps
  of up to SMALL_CALL_ROWS rows per row of x: no step of it would be split among threads, and smaller steps compile
  less code."""
  if batch > MAX_PARTS:
    raise ValueError(f"a step of the CPU path takes at most {MAX_PARTS} rows of x, got {batch}")
  if is_small_call(batch, k, row_bytes):
    return 1, min(SMALL_CALL_ROWS, k)
  step_bytes = memory_bound_threads() * XLA_CPU_BYTES_PER_THREAD  # the least a step split over all threads reads
  wanted = -(-5 * step_bytes // (4 * row_bytes))
  rows = min(MAX_ROWS_PER_STEP, max(CPU_ROWS_PER_STEP, wanted))
  per_row = min(k, -(-rows // batch))  # at least 24: 192 rows over at most MAX_PARTS rows of x
  groups = min(BATCH1_GROUPS if batch == 1 else MAX_PARTS // batch, per_row)
  group = -(-per_row // groups)
  return -(-per_row // group), group


def dense_read(values_bk: jax.Array, indices_bk: jax.Array, w_dn: jax.Array, sparse_bd: jax.Array | None = None
               ) -> jax.Array:
  """float32 [B, N] = (x ⊙ M) W as a dense product, times all of W (float32: cpu_reads.dense_readable): x ⊙ M is
  sparse_bd where given, else the kept entries scattered into zeros [B, D]."""
  if sparse_bd is None:
    b = values_bk.shape[0]
    sparse_bd = jnp.zeros((b, w_dn.shape[0]), jnp.float32).at[jnp.arange(b)[:, None], indices_bk].add(
        values_bk.astype(jnp.float32), mode="promise_in_bounds")
  return jnp.dot(sparse_bd.astype(jnp.float32), w_dn, precision=lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("plan", "dense_reads"))
def _cpu_sparse_matvecs(values_bk, indices_bk, ws_dn: tuple, scales: tuple, sparse_bd=None, *,
                        plan: tuple[int, int], dense_reads: tuple[bool, ...]) -> tuple:
  """The CPU path: the Ws marked in dense_reads (cpu_reads.choose) as dense_read, the others in one row loop. Where
  every W is read whole and sparse_bd is given, the kept entries are not used (XLA drops what computed them)."""
  looped = [n for n, dense in enumerate(dense_reads) if not dense]
  ys = dict(zip(looped, _xla_sparse_matvecs(values_bk, indices_bk, tuple(ws_dn[n] for n in looped),
                                            tuple(scales[n] for n in looped), plan=plan) if looped else ()))
  return tuple(ys[n] if n in ys else dense_read(values_bk, indices_bk, w, sparse_bd) for n, w in enumerate(ws_dn))


@functools.partial(jax.jit, static_argnames=("plan",))
def _xla_sparse_matvecs(values_bk, indices_bk, ws_dn: tuple, scales: tuple, *, plan: tuple[int, int]) -> tuple:
  """[B, N_w] float32 for each W in ws_dn: one scan over the kept entries that reads row i_j of every W in the same
  loop body (the projections of one sparsified input share their chunks of values and indices). A W with a scale
  (not None) is ternary: each row read is ternarized with it, inside the same loop.

  plan = (G, g) (cpu_loop_plan): each step takes G g kept entries of every row of x and adds, for each W, partial
  sums [B, G, N_w], group q of row r holding Σ_j v_j W[i_j] over its g entries: one fused loop per W whose body
  gathers G rows of W g times per row of x (one dynamic slice where G is 1), each row contiguous, and whose outer
  dimension XLA's CPU backend splits among threads. y is the sum of the G partial sums. More than MAX_PARTS rows
  of x run in blocks of MAX_PARTS."""
  b, k = values_bk.shape
  if b > MAX_PARTS:  # blocks of MAX_PARTS rows of x, one scan each
    blocks = [_xla_sparse_matvecs(values_bk[s:s + MAX_PARTS], indices_bk[s:s + MAX_PARTS], ws_dn, scales, plan=plan)
              for s in range(0, b, MAX_PARTS)]
    return tuple(jnp.concatenate(parts) for parts in zip(*blocks))
  groups, group = plan
  chunk = groups * group
  padded = -(-k // chunk) * chunk  # padding entries have value 0 (at row 0)
  to_steps = lambda a: jnp.pad(a, ((0, 0), (0, padded - k))).reshape(b, -1, groups, group).swapaxes(0, 1)
  v_cbgj, i_cbgj = to_steps(values_bk.astype(jnp.float32)), to_steps(indices_bk.astype(jnp.int32))

  def take(a, i_g):  # [G, N]: rows i_g of a, one dynamic slice where G is 1
    return lax.dynamic_index_in_dim(a, i_g[0]) if groups == 1 else a.at[i_g].get(mode="promise_in_bounds")

  def rows(w, scale, i_g):  # float32 [G, N]: row i_g[q] of W (as its scale ternarizes it) for each group q
    if is_packed(w):  # byte row i % Q, bit pair i // Q (pack_ternary)
      q = w.shape[0]
      return unpack_plane(take(w, i_g % q), (i_g // q)[:, None]).astype(jnp.float32)
    w_g = take(w, i_g).astype(jnp.float32)
    return w_g if scale is None else _ternary_rows(w_g, scale)

  def body(acc, step_in):
    v_bgj, i_bgj = step_in

    def partial_sums(w, scale):  # [B, G, N]: group q of row r sums v_j W[i_j] over its g entries, one fused loop
      return jnp.stack([sum(v_bgj[r, :, j, None] * rows(w, scale, i_bgj[r, :, j]) for j in range(group))
                        for r in range(b)])

    return tuple(a + partial_sums(w, scale) for a, w, scale in zip(acc, ws_dn, scales)), None

  init = tuple(jnp.zeros((b, groups, w.shape[1]), jnp.float32) for w in ws_dn)
  ys, _ = lax.scan(body, init, (v_cbgj, i_cbgj))
  return tuple(y.sum(axis=1) for y in ys)


def _kernel_matvecs(values_bk, indices_bk, ws_dn, *, block_sizes, interpret):
  """float32 [B, N_w] per W from the kernel: K padded with zeros at row 0; 16-bit W read as word pairs."""
  k = values_bk.shape[1]
  out = []
  for w_dn, bs in zip(ws_dn, block_sizes):
    pad = ((0, 0), (0, padded_k(k, bs.block_k) - k))
    values, indices = jnp.pad(values_bk.astype(w_dn.dtype), pad), jnp.pad(indices_bk.astype(jnp.int32), pad)
    if jnp.dtype(w_dn.dtype).itemsize == 2:  # value j at 2j + (i mod 2), row i in word row i // 2 (kernel.py)
      odd = (indices & 1) == 1
      zero = jnp.zeros_like(values)
      values = jnp.stack([jnp.where(odd, zero, values), jnp.where(odd, values, zero)], axis=-1)
      values, indices = values.reshape(values.shape[0], -1), indices >> 1
    out.append(sparse_matvec_pallas(values, indices, w_dn, block_sizes=bs, interpret=interpret))
  return tuple(out)


def sparse_matvec(values_bk: jax.Array, indices_bk: jax.Array, w_dn: jax.Array, *, backend: str = "auto",
                  plan: tuple[int, int] | None = None, block_sizes: BlockSizes | None = None) -> jax.Array:
  """y [B, N] = (x ⊙ M) W from the kept entries of each row of x: values_bk [B, K] at indices_bk [B, K] in [0, D).

  Reads only the K selected rows of W [D, N] per batch row (method.md §1: the projection of a top-K sparsified
  input). Small batches (B up to 16) each keep their own entries. Accumulates in float32; returns the dtype of
  values and W promoted. Indices must be in range (they are not checked inside jit).
  """
  (y_bn,) = sparse_matvecs(values_bk, indices_bk, (w_dn,), backend=backend, plan=plan, block_sizes=block_sizes)
  return y_bn


def sparse_matvecs(values_bk: jax.Array, indices_bk: jax.Array, ws_dn, *, backend: str = "auto",
                   plan: tuple[int, int] | None = None, block_sizes=None, ternary_scales=None,
                   sparse_bd: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """(x ⊙ M) W for each W [D, N_w] in ws_dn, the projections that read one sparsified input (q, k and v; gate and
  up). The CPU fast path streams the selected row of every W in one pass; the kernel runs once per W.

  ternary_scales: None, or per W None or the absmean scale α + ε of a ternary W (absmean_ternary): that W counts
  as ternarize(W), and the CPU path ternarizes only the rows it reads (the kernels take the whole ternarized W).
  A uint8 W is packed ternary codes [D/4, N] (pack_ternary): y is Σ_j v_j codes[i_j] unscaled, on the XLA path only.
  Above batch 1 the CPU path may read a float32 W whole, as the dense product of the scattered kept entries: by a
  rule, or by a measurement at first use within cpu_reads.measuring() (see cpu_reads).
  sparse_bd: optionally x ⊙ M [B, D] itself, the input the kept entries come from (topk_entries' mask times x), which
  whole-W reads multiply instead of scattering the entries.

  plan: (groups, group), the kept entries per row of x in each step of the XLA path (default: cpu_loop_plan in a
    program compiled for the CPU, (1, DEVICE_ROWS_PER_STEP) in one compiled for a GPU or TPU).
  block_sizes: the kernel's tiles, one BlockSizes for every W or one per W (default: per chip, fitted to each W).
  """
  ws_dn = tuple(ws_dn)
  if not ws_dn:
    raise ValueError("expected at least one weight matrix")
  for w_dn in ws_dn:
    _check(values_bk, indices_bk, w_dn)
  if len({input_size(w) for w in ws_dn}) != 1:
    raise ValueError(f"every W must have the same input size D, got shapes {[w.shape for w in ws_dn]}")
  if sparse_bd is not None and sparse_bd.shape != (values_bk.shape[0], input_size(ws_dn[0])):
    raise ValueError(f"sparse_bd must be x ⊙ M [B, D] = {(values_bk.shape[0], input_size(ws_dn[0]))}, "
                     f"got shape {sparse_bd.shape}")
  row_bytes = 4 * max(w.shape[1] for w in ws_dn)
  if plan is None:
    # rows sized by their float32 width whatever W's dtype: a step's code is N float32 sums per row read, and packed
    # codes sized by their own bytes (1/16) asked for 256 rows a step, a 22-layer program compiling for many minutes
    cpu_plan = cpu_loop_plan(min(values_bk.shape[0], MAX_PARTS), values_bk.shape[1], row_bytes)
    device_plan = (1, min(values_bk.shape[1], DEVICE_ROWS_PER_STEP))
  elif len(plan) != 2 or min(plan) < 1:
    raise ValueError(f"plan must be (groups, group), two positive counts, got {plan!r}")
  else:
    cpu_plan = device_plan = tuple(int(p) for p in plan)
  if backend == "pallas" and any(is_packed(w) for w in ws_dn):
    raise ValueError("packed ternary W (uint8) is read by the XLA path only: use backend 'xla' or 'auto'")
  out_dtypes = [jnp.promote_types(values_bk.dtype, w.dtype) for w in ws_dn]
  dispatch.check(backend)
  scales = tuple(ternary_scales) if ternary_scales is not None else (None,) * len(ws_dn)
  if len(scales) != len(ws_dn):
    raise ValueError(f"ternary_scales must have one entry per W ({len(ws_dn)}), got {len(scales)}")
  if block_sizes is None:
    block_sizes = tuple(BlockSizes.get_default(values_bk.shape[1], w.shape[1], chip=dispatch.chip_name())
                        for w in ws_dn)
  elif isinstance(block_sizes, BlockSizes):
    block_sizes = (block_sizes,) * len(ws_dn)
  if len(block_sizes) != len(ws_dn) or not all(isinstance(bs, BlockSizes) for bs in block_sizes):
    raise ValueError(f"block_sizes must be a sparse_matvec BlockSizes or one per W, got {block_sizes!r}")

  def ternarized(kernel_fn):  # the kernels read W as stored: hand them the whole ternarized W
    return lambda v, i, ws, **kwargs: kernel_fn(v, i, tuple(w if s is None else _ternary_rows(w, s).astype(w.dtype)
                                                            for w, s in zip(ws, scales)), **kwargs)

  def xla(v, i, ws):  # the CPU's plan and dense reads where the program is compiled for the CPU, one loop elsewhere
    dense_reads = cpu_reads.choose(v, ws, scales, matvecs=functools.partial(_cpu_sparse_matvecs, plan=cpu_plan),
                                   small=is_small_call(min(v.shape[0], MAX_PARTS), v.shape[1], row_bytes))
    cpu = lambda *args: _cpu_sparse_matvecs(*args, scales, sparse_bd, plan=cpu_plan, dense_reads=dense_reads)
    device = lambda *args: _xla_sparse_matvecs(*args, scales, plan=device_plan)
    if cpu_plan == device_plan and not any(dense_reads):
      return device(v, i, ws)
    return lax.platform_dependent(v, i, ws, cpu=cpu, default=device)

  # (other W: "pallas" on a GPU interprets the TPU kernel)
  gpu = dispatch.GpuKernel("sparse_matvec", ternarized(_gpu_matvecs))
  ys = dispatch.select(
      backend, ternarized(functools.partial(_kernel_matvecs, block_sizes=tuple(block_sizes))), xla,
      values_bk, indices_bk, ws_dn,
      kernel_ok=all(kernel_supported(values_bk.shape, w.shape, w.dtype) for w in ws_dn),
      gpu=gpu if all(gpu_kernel_supported(w.shape, w.dtype) for w in ws_dn) else None)
  return tuple(y.astype(t) for y, t in zip(ys, out_dtypes))
