"""Public entry: sparse_matvec(values, indices, W) and the (values, indices) form of a top-K sparsified input.

Backends (pallas_kernels.dispatch): "pallas" is the Mosaic TPU row-gather kernel (kernel.py); "xla" is plain JAX.
On the CPU the XLA path is a fast path of its own: a scan over chunks of `chunk` kept activations whose body is one
fused loop, y += Σ_j v_j · W[i_j, :], so each selected row streams through the cache once with no gathered copy
(`jnp.take` of the rows and then a dot writes and re-reads them, and is slower than the dense matvec).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import dispatch
from pallas_kernels.sparse_matvec.kernel import sparse_matvec_pallas
from qsparse_jax.selection import mask_from_thresholds, row_thresholds

PALLAS_PLATFORMS = ("tpu",)


def topk_values_indices(x_bd: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The K largest-|x| entries of each row as (values [B, K], indices [B, K] ascending): Topk(|x|) of method.md
  Eq. 2 in gathered form (exact, ties to the lower index, as qsparse_jax.topk_mask)."""
  if x_bd.ndim != 2 or not 0 < k <= x_bd.shape[1]:
    raise ValueError(f"expected x [B, D] and 0 < k <= D, got shape {x_bd.shape} and k={k}")
  mask_bd = mask_from_thresholds(x_bd, *row_thresholds(x_bd, k))
  indices_bk = jax.vmap(lambda m: jnp.nonzero(m, size=k, fill_value=0)[0])(mask_bd).astype(jnp.int32)
  return jnp.take_along_axis(x_bd, indices_bk, axis=1), indices_bk


def _check(values_bk, indices_bk, w_dn):
  if values_bk.ndim != 2 or values_bk.shape != indices_bk.shape:
    raise ValueError(f"values and indices must both be [B, K], got {values_bk.shape} and {indices_bk.shape}")
  if not jnp.issubdtype(indices_bk.dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got {indices_bk.dtype}")
  if w_dn.ndim != 2:
    raise ValueError(f"W must be [D, N], got shape {w_dn.shape}")


@functools.partial(jax.jit, static_argnames=("chunk",))
def _xla_sparse_matvec(values_bk, indices_bk, w_dn, *, chunk: int):
  b, k = values_bk.shape
  n = w_dn.shape[1]
  padded = -(-k // chunk) * chunk  # padding entries have value 0 (at row 0)
  v_cbj = jnp.pad(values_bk.astype(jnp.float32), ((0, 0), (0, padded - k))).reshape(b, -1, chunk).swapaxes(0, 1)
  i_cbj = jnp.pad(indices_bk.astype(jnp.int32), ((0, 0), (0, padded - k))).reshape(b, -1, chunk).swapaxes(0, 1)

  def body(acc_bn, chunk_in):
    v_bj, i_bj = chunk_in
    rows = [[v_bj[r, j] * lax.dynamic_index_in_dim(w_dn, i_bj[r, j], keepdims=False).astype(jnp.float32)
             for j in range(chunk)] for r in range(b)]
    return acc_bn + jnp.stack([sum(row) for row in rows]), None

  y_bn, _ = lax.scan(body, jnp.zeros((b, n), jnp.float32), (v_cbj, i_cbj))
  return y_bn


def _block(size: int, candidates: tuple[int, ...]) -> int:
  return next((c for c in candidates if size % c == 0), size)


def sparse_matvec(values_bk: jax.Array, indices_bk: jax.Array, w_dn: jax.Array, *, backend: str = "auto",
                  chunk: int = 16) -> jax.Array:
  """y [B, N] = (x ⊙ M) W from the kept entries of each row of x: values_bk [B, K] at indices_bk [B, K] in [0, D).

  Reads only the K selected rows of W [D, N] per batch row (method.md §1: the projection of a top-K sparsified
  input). Small batches (B up to 16) each keep their own entries. Accumulates in float32; returns the dtype of
  values and W promoted. Indices must be in range (they are not checked inside jit).
  """
  _check(values_bk, indices_bk, w_dn)
  out_dtype = jnp.promote_types(values_bk.dtype, w_dn.dtype)
  impl, interpret = dispatch.resolve(backend, pallas_platforms=PALLAS_PLATFORMS)
  if impl == "xla":
    return _xla_sparse_matvec(values_bk, indices_bk, w_dn, chunk=chunk).astype(out_dtype)
  k = values_bk.shape[1]
  bk = min(128, -(-k // 8) * 8)
  padded = -(-k // bk) * bk
  values = jnp.pad(values_bk, ((0, 0), (0, padded - k)))
  indices = jnp.pad(indices_bk, ((0, 0), (0, padded - k)))
  bn = _block(w_dn.shape[1], (2048, 1024, 512, 256, 128))
  return sparse_matvec_pallas(values, indices, w_dn, bk=bk, bn=bn, interpret=interpret).astype(out_dtype)
