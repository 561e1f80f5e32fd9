"""Public entry: sparse_matvec(values, indices, W) and the (values, indices) form of a top-K sparsified input.

Backends (pallas_kernels.dispatch.select): on a TPU the Mosaic row-gather kernel (kernel.py) for the inputs
`kernel_supported` accepts (or backend="pallas"); on an H100/H200 the Mosaic GPU kernel (kernel_gpu.py) with
backend="pallas", or "auto" once pallas_kernels/gpu_verified.py records it for that GPU (`gpu_kernel_supported`
inputs); elsewhere plain JAX. On the CPU the XLA path is a fast path of its
own: a scan over chunks of `chunk` kept activations whose body is one
fused loop, y += Σ_j v_j · W[i_j, :], so each selected row streams through the cache once with no gathered copy
(`jnp.take` of the rows and then a dot writes and re-reads them, and is slower than the dense matvec). That path
also reads packed ternary weights (uint8 [D/4, N], pallas_kernels.ternary_matmul.pack_ternary), decoding the 2-bit
codes of the rows it reads: the decode step of a packed 1.58-bit model reads a sixteenth of the float32 bytes of
its kept rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import dispatch
from pallas_kernels.sparse_matvec.kernel import BlockSizes, padded_k, sparse_matvec_pallas
from pallas_kernels.sparse_matvec.kernel_gpu import GpuBlockSizes, sparse_matvec_gpu
from pallas_kernels.ternary_matmul.kernel import unpack_plane
from qsparse_jax.ops.selection import mask_from_thresholds, row_thresholds
from qsparse_jax.ops.sparsity import ternary_codes

PALLAS_PLATFORMS = ("tpu",)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
MAX_PREFETCH_INDICES = 128 * 1024  # B x K row indices live in SMEM (1 MiB per core on v5p and v6e)
# Row reads per step of the CPU path's loop, over the B rows of x and every W it streams: a step's code and compile
# time grow with them. 16 (8 kept entries each for two or three W) streamed as fast inside the decode loop as 32,
# which at batch 1 lets XLA share a step among the CPU's threads (2.2x dense on one projection vs 1.9x) but
# compiled twice the code (docs/benchmarks.md). Each row takes at least MIN_CHUNK entries per step (default_chunk).
CPU_CHUNK = 16
MIN_CHUNK = 8


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


def topk_values_indices(x_bd: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The K largest-|x| entries of each row as (values [B, K], indices [B, K] ascending): Topk(|x|) of method.md
  Eq. 2 in gathered form (exact, ties to the lower index, as qsparse_jax.topk_mask)."""
  if x_bd.ndim != 2 or not 0 < k <= x_bd.shape[1]:
    raise ValueError(f"expected x [B, D] and 0 < k <= D, got shape {x_bd.shape} and k={k}")
  indices_bk = kept_indices(mask_from_thresholds(x_bd, *row_thresholds(x_bd, k)), k)
  return jnp.take_along_axis(x_bd, indices_bk, axis=1), indices_bk


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


def _packed_row(packed, i):
  """Row i of the ternary codes packed in uint8 [Q, ...] as float32 {-1, 0, 1}: bit pair i // Q of byte row i % Q
  (pack_ternary: weight row p Q + q sits in bits 2p of byte row q)."""
  q = packed.shape[0]
  return unpack_plane(lax.dynamic_index_in_dim(packed, i % q, keepdims=False), i // q).astype(jnp.float32)


def _ternary_rows(rows, scale):
  """Rows of W as ternarize(W) has them, from the whole tensor's absmean scale α + ε (method.md §4)."""
  return ternary_codes(rows, scale) * scale


def default_chunk(batch: int, num_ws: int) -> int:
  """Kept entries per step of the CPU path for B rows of x and num_ws W: CPU_CHUNK / (B num_ws), at least MIN_CHUNK
  (16 for one W at batch 1, else 8). At batch 8, 32 per row decoded 1.2x faster than 8 but compiled 4x the code."""
  return max(MIN_CHUNK, CPU_CHUNK // (batch * num_ws))


def column_blocks(n_out: int) -> int:
  """How many column blocks the CPU path splits an output of n_out columns into: 8, 4, 2 or 1, the most that divide
  it. They make the outer dimension of each loop step's output, which XLA's CPU backend can share among threads."""
  return next(p for p in (8, 4, 2, 1) if n_out % p == 0)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _xla_sparse_matvecs(values_bk, indices_bk, ws_dn: tuple, scales: tuple, *, chunk: int) -> tuple:
  """[B, N_w] float32 for each W in ws_dn: one scan over the kept entries that reads row i_j of every W in the same
  loop body (the projections of one sparsified input share their chunks of values and indices). A W with a scale
  (not None) is ternary: each row read is ternarized with it, inside the same loop.

  Each step's partial sums are [P, B, N_w / P] (P = column_blocks(N_w)): a leading dimension of P column blocks,
  so that XLA's CPU backend may split the step among its threads even at batch 1 (it splits a loop's outer
  dimension when the step's cost is large enough, which `chunk` rows of W make it). W [D, N] read as [D, P, N / P]
  is the same memory, so each row is still one contiguous read. With P = 1 the sums are [B, N] (a unit axis in W's
  shape lets XLA:CPU copy the whole W each call)."""
  b, k = values_bk.shape
  padded = -(-k // chunk) * chunk  # padding entries have value 0 (at row 0)
  v_cbj = jnp.pad(values_bk.astype(jnp.float32), ((0, 0), (0, padded - k))).reshape(b, -1, chunk).swapaxes(0, 1)
  i_cbj = jnp.pad(indices_bk.astype(jnp.int32), ((0, 0), (0, padded - k))).reshape(b, -1, chunk).swapaxes(0, 1)
  blocks = tuple(column_blocks(w.shape[1]) for w in ws_dn)
  ws = tuple(w if p == 1 else w.reshape(w.shape[0], p, -1) for w, p in zip(ws_dn, blocks))  # [D, N] or [D, P, N/P]

  def body(acc, chunk_in):
    v_bj, i_bj = chunk_in

    def axpys(w, scale):  # Σ_j v_j W[i_j] for each batch row, one fused loop: [B, N] or [P, B, N/P]
      def row(i):
        if is_packed(w):
          return _packed_row(w, i)
        w_i = lax.dynamic_index_in_dim(w, i, keepdims=False).astype(jnp.float32)
        return w_i if scale is None else _ternary_rows(w_i, scale)
      rows = jnp.stack([sum(v_bj[r, j] * row(i_bj[r, j]) for j in range(chunk)) for r in range(b)])
      return rows if w.ndim == 2 else rows.swapaxes(0, 1)

    return tuple(a + axpys(w, scale) for a, w, scale in zip(acc, ws, scales)), None

  init = tuple(jnp.zeros((b, w.shape[1]) if w.ndim == 2 else (w.shape[1], b, w.shape[2]), jnp.float32) for w in ws)
  ys, _ = lax.scan(body, init, (v_cbj, i_cbj))
  return tuple(y if y.ndim == 2 else y.swapaxes(0, 1).reshape(b, -1) for y in ys)


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
                  chunk: int = 16, block_sizes: BlockSizes | None = None) -> jax.Array:
  """y [B, N] = (x ⊙ M) W from the kept entries of each row of x: values_bk [B, K] at indices_bk [B, K] in [0, D).

  Reads only the K selected rows of W [D, N] per batch row (method.md §1: the projection of a top-K sparsified
  input). Small batches (B up to 16) each keep their own entries. Accumulates in float32; returns the dtype of
  values and W promoted. Indices must be in range (they are not checked inside jit).
  """
  (y_bn,) = sparse_matvecs(values_bk, indices_bk, (w_dn,), backend=backend, chunk=chunk, block_sizes=block_sizes)
  return y_bn


def sparse_matvecs(values_bk: jax.Array, indices_bk: jax.Array, ws_dn, *, backend: str = "auto",
                   chunk: int | None = None, block_sizes=None, ternary_scales=None) -> tuple[jax.Array, ...]:
  """(x ⊙ M) W for each W [D, N_w] in ws_dn, the projections that read one sparsified input (q, k and v; gate and
  up). The CPU fast path streams the selected row of every W in one pass; the kernel runs once per W.

  ternary_scales: None, or per W None or the absmean scale α + ε of a ternary W (absmean_ternary): that W counts
  as ternarize(W), and the CPU path ternarizes only the rows it reads (the kernels take the whole ternarized W).
  A uint8 W is packed ternary codes [D/4, N] (pack_ternary): y is Σ_j v_j codes[i_j] unscaled, on the XLA path only.

  chunk: kept entries per scan step of the CPU path (default: default_chunk(B, len(ws_dn))).
  block_sizes: the kernel's tiles, one BlockSizes for every W or one per W (default: per chip, fitted to each W).
  """
  ws_dn = tuple(ws_dn)
  if chunk is None:
    chunk = default_chunk(values_bk.shape[0], len(ws_dn))
  if not ws_dn:
    raise ValueError("expected at least one weight matrix")
  for w_dn in ws_dn:
    _check(values_bk, indices_bk, w_dn)
  if len({input_size(w) for w in ws_dn}) != 1:
    raise ValueError(f"every W must have the same input size D, got shapes {[w.shape for w in ws_dn]}")
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

  # (other W: "pallas" on a GPU interprets the TPU kernel)
  gpu = dispatch.GpuKernel("sparse_matvec", ternarized(_gpu_matvecs))
  ys = dispatch.select(
      backend, ternarized(functools.partial(_kernel_matvecs, block_sizes=tuple(block_sizes))),
      lambda v, i, ws: _xla_sparse_matvecs(v, i, ws, scales, chunk=chunk), values_bk, indices_bk, ws_dn,
      kernel_ok=all(kernel_supported(values_bk.shape, w.shape, w.dtype) for w in ws_dn),
      gpu=gpu if all(gpu_kernel_supported(w.shape, w.dtype) for w in ws_dn) else None)
  return tuple(y.astype(t) for y, t in zip(ys, out_dtypes))
