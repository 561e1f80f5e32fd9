"""Public entry: nm_matmul(x, W, n, m) = (x ⊙ M_n:m) W, differentiable with the straight-through estimator.

Backends (pallas_kernels.dispatch): "pallas" is kernel.py (Mosaic TPU; interpret mode elsewhere); "xla" masks with
qsparse_jax.block_topk_mask and lets XLA fuse the mask into the dot's operand (the CPU's fast path, and GPUs').
The backward pass is plain XLA in both: dx = g Wᵀ (the mask is passed straight through, method.md Eq. 5) and
dW = (x ⊙ M)ᵀ g.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qsparse_jax.ops import block_topk_mask
from pallas_kernels import dispatch
from pallas_kernels.nm_matmul.kernel import nm_matmul_pallas

PALLAS_PLATFORMS = ("tpu",)


def _tile(size: int, candidates: tuple[int, ...], multiple_of: int = 1) -> int:
  return next((c for c in candidates if size % c == 0 and c % multiple_of == 0), size)


def _masked(x, n, m):
  return jnp.where(block_topk_mask(x, n, m), x, jnp.zeros_like(x))


def _forward(x_td, w_dn, n, m, backend):
  impl, interpret = dispatch.resolve(backend, pallas_platforms=PALLAS_PLATFORMS)
  if impl == "xla":
    return jnp.dot(_masked(x_td, n, m), w_dn.astype(x_td.dtype), preferred_element_type=jnp.float32)
  t, d = x_td.shape
  bt = _tile(t, (256, 128, 64, 32, 16, 8))
  bn = _tile(w_dn.shape[1], (512, 256, 128))
  bd = _tile(d, (512, 256, 128), multiple_of=m)
  return nm_matmul_pallas(x_td, w_dn, n=n, m=m, bt=bt, bn=bn, bd=bd, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _nm_matmul(x_td, w_dn, n, m, backend):
  return _forward(x_td, w_dn, n, m, backend)


def _fwd(x_td, w_dn, n, m, backend):
  return _forward(x_td, w_dn, n, m, backend), (x_td, w_dn)


def _bwd(n, m, backend, saved, g_tn):
  x_td, w_dn = saved
  g32 = g_tn.astype(jnp.float32)
  dx = jnp.dot(g32, w_dn.astype(jnp.float32).T).astype(x_td.dtype)
  dw = jnp.dot(_masked(x_td, n, m).astype(jnp.float32).T, g32).astype(w_dn.dtype)
  return dx, dw


_nm_matmul.defvjp(_fwd, _bwd)


def nm_matmul(x: jax.Array, w_dn: jax.Array, n: int, m: int, *, backend: str = "auto") -> jax.Array:
  """(x ⊙ M) W where M keeps the n largest |x| in every m consecutive values of each row (Block Q-Sparse, §5).

  x: [..., D] (D a multiple of m), w_dn: [D, N]. Accumulates in float32; returns x's and W's dtype promoted.
  """
  if x.ndim < 1 or w_dn.ndim != 2 or x.shape[-1] != w_dn.shape[0]:
    raise ValueError(f"expected x [..., D] and W [D, N] with the same D, got {x.shape} and {w_dn.shape}")
  if not 0 < n <= m or x.shape[-1] % m:
    raise ValueError(f"n:m must have 0 < n <= m and m dividing D={x.shape[-1]}, got {n}:{m}")
  dispatch.resolve(backend, pallas_platforms=PALLAS_PLATFORMS)
  out_dtype = jnp.promote_types(x.dtype, w_dn.dtype)
  y = _nm_matmul(x.reshape(-1, x.shape[-1]), w_dn, n, m, backend)
  return y.reshape(*x.shape[:-1], w_dn.shape[1]).astype(out_dtype)
