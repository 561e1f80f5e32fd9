"""Public entries: topk_sparsify (differentiable, straight-through) and topk_sparsify_int8 (inference).

Backends (pallas_kernels.dispatch): "pallas" runs kernel.py (Mosaic TPU; interpret mode elsewhere), "xla" the
library's fast selection (qsparse_jax.ops.selection), which is the CPU's fast path and what GPUs run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qsparse_jax.ops import absmax_quantize, topk_mask
from pallas_kernels import dispatch
from pallas_kernels.topk.kernel import topk_pallas

PALLAS_PLATFORMS = ("tpu",)
ROW_BLOCK = 8  # rows per grid step: one float32 sublane tile


def _check(x, k):
  if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a floating array [..., D], got {x.dtype} of shape {x.shape}")
  if not 0 < k <= x.shape[-1]:
    raise ValueError(f"k must be in [1, D={x.shape[-1]}], got {k}")


def _rows(x):
  """x [..., D] as [T, D] padded to a multiple of ROW_BLOCK rows, and a function restoring the result's shape."""
  lead, d = x.shape[:-1], x.shape[-1]
  x_td = x.reshape(-1, d)
  t = x_td.shape[0]
  padded = -(-t // ROW_BLOCK) * ROW_BLOCK
  return jnp.pad(x_td, ((0, padded - t), (0, 0))), lambda y: y[:t].reshape(*lead, y.shape[-1])


def _forward(x, k, backend):
  impl, interpret = dispatch.resolve(backend, pallas_platforms=PALLAS_PLATFORMS)
  if impl == "xla":
    return jnp.where(topk_mask(x, k), x, jnp.zeros_like(x))
  x_td, restore = _rows(x)
  return restore(topk_pallas(x_td, k=k, bt=ROW_BLOCK, interpret=interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sparsify(x, k, gradient, backend):
  return _forward(x, k, backend)


def _sparsify_fwd(x, k, gradient, backend):
  y = _forward(x, k, backend)
  return y, (y != 0) if gradient == "masked" else None


def _sparsify_bwd(k, gradient, backend, kept, g):
  # "ste": the straight-through estimator of method.md §2 (Eq. 5), the gradient passes the mask unchanged;
  # "masked": the gradient of x ⊙ M with M held fixed (the paper's Fig. 2 ablation).
  return (g if gradient == "ste" else jnp.where(kept, g, jnp.zeros_like(g)),)


_sparsify.defvjp(_sparsify_fwd, _sparsify_bwd)


def topk_sparsify(x: jax.Array, k: int, *, gradient: str = "ste", backend: str = "auto") -> jax.Array:
  """x ⊙ Topk(|x|): the k largest-magnitude entries of each row kept, the rest zeroed (method.md §1, Eq. 1-2).

  gradient: "ste" (straight-through, Eq. 5) or "masked". x: [..., D]; returns x's shape and dtype.
  """
  _check(x, k)
  if gradient not in ("ste", "masked"):
    raise ValueError(f"gradient must be 'ste' or 'masked', got {gradient!r}")
  dispatch.resolve(backend, pallas_platforms=PALLAS_PLATFORMS)  # validate before tracing
  return _sparsify(x, k, gradient, backend)


def topk_sparsify_int8(x: jax.Array, k: int, *, backend: str = "auto") -> tuple[jax.Array, jax.Array]:
  """(int8 codes [..., D] of x ⊙ Topk(|x|), scale float32 [..., 1]) with x ≈ codes / scale on the kept entries.

  The per-token absmax quantization of method.md §4 (γ = max|x|, which top-K always keeps), fused with selection.
  """
  _check(x, k)
  impl, interpret = dispatch.resolve(backend, pallas_platforms=PALLAS_PLATFORMS)
  if impl == "xla":
    codes, scale = absmax_quantize(x, 8)
    return jnp.where(topk_mask(x, k), codes, jnp.zeros_like(codes)), scale
  x_td, restore = _rows(x)
  codes, scale = topk_pallas(x_td, k=k, bt=ROW_BLOCK, int8=True, interpret=interpret)
  return restore(codes), restore(scale)
