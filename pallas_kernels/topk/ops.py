"""Public entries: topk_sparsify (differentiable, straight-through or masked) and topk_sparsify_int8 (inference).

Backends (pallas_kernels.dispatch.select): the kernel of kernel.py where the program is compiled for a TPU and the
input is one `kernel_supported` accepts (or backend="pallas"), else the library's selection
(qsparse_jax.ops.selection), the CPU's fast path and what GPUs run. Both compute the same mask, so the backward
pass is the same too: "ste" passes the cotangent unchanged, "masked" multiplies it by the exact top-K mask, which
it rebuilds from the output and the per-row thresholds (tau_key, last) of either path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import dispatch
from pallas_kernels.topk.kernel import BlockSizes, topk_pallas
from qsparse_jax.ops import absmax_quantize, mask_from_thresholds, row_thresholds, topk_mask
from qsparse_jax.ops.selection import keeps, magnitude_key

PALLAS_PLATFORMS = ("tpu",)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
MAX_KERNEL_WIDTH = 16384  # the whole row is one VMEM block; widths up to this are compiled in the TPU tests


def kernel_supported(x_shape: tuple[int, ...], dtype) -> bool:
  """Whether "auto" runs the kernel on a TPU: float32 or bfloat16 rows whose width D is a multiple of 128 lanes and
  at most MAX_KERNEL_WIDTH (tests/test_tpu_compile.py compiles these for TPU v5p and v6e)."""
  d = x_shape[-1]
  return jnp.dtype(dtype) in map(jnp.dtype, KERNEL_DTYPES) and d % dispatch.LANES == 0 and d <= MAX_KERNEL_WIDTH


def _check(x, k):
  if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a floating array [..., D], got {x.dtype} of shape {x.shape}")
  if not 0 < k <= x.shape[-1]:
    raise ValueError(f"k must be in [1, D={x.shape[-1]}], got {k}")


def _block_sizes(x, block_sizes, int8=False) -> BlockSizes:
  if block_sizes is None:
    return BlockSizes.get_default(x.dtype, x.shape[-1], int8=int8, chip=dispatch.chip_name())
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a pallas_kernels.topk BlockSizes, got {block_sizes!r}")
  block_sizes.validate(x.dtype, int8=int8)
  return block_sizes


def _rows(x, block_rows):
  """x [..., D] as [T, D] padded to a multiple of block_rows rows, and a function restoring a result's shape."""
  lead, d = x.shape[:-1], x.shape[-1]
  x_td = x.reshape(-1, d)
  t = x_td.shape[0]
  return (jnp.pad(x_td, ((0, dispatch.round_up(t, block_rows) - t), (0, 0))),
          lambda y: y[:t].reshape(*lead, y.shape[-1]))


def _kernel_forward(x, *, k, thresholds, block_sizes, interpret):
  x_td, restore = _rows(x, block_sizes.block_rows)
  out = topk_pallas(x_td, k=k, block_sizes=block_sizes, thresholds=thresholds, interpret=interpret)
  return tuple(map(restore, out)) if thresholds else restore(out)


def _xla_forward(x, *, k, thresholds):
  # Without the thresholds (straight-through), zeros tied at a zero threshold may all count as kept: same x ⊙ M.
  tau, last = row_thresholds(x, k, exact_zero_ties=thresholds)
  y = jnp.where(mask_from_thresholds(x, tau, last), x, jnp.zeros_like(x))
  return (y, lax.bitcast_convert_type(tau, jnp.int32)[..., None], last[..., None]) if thresholds else y


def _forward(x, k, thresholds, backend, block_sizes):
  return dispatch.select(
      backend, functools.partial(_kernel_forward, k=k, thresholds=thresholds, block_sizes=block_sizes),
      functools.partial(_xla_forward, k=k, thresholds=thresholds), x,
      kernel_ok=kernel_supported(x.shape, x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _sparsify(x, k, gradient, backend, block_sizes):
  return _forward(x, k, False, backend, block_sizes)


def _sparsify_fwd(x, k, gradient, backend, block_sizes):
  if gradient == "ste":
    return _forward(x, k, False, backend, block_sizes), None
  y, tau_key, last = _forward(x, k, True, backend, block_sizes)
  return y, (y, tau_key, last)


def _sparsify_bwd(k, gradient, backend, block_sizes, residuals, g):
  # "ste": the straight-through estimator of method.md §2 (Eq. 5), the gradient passes the mask unchanged;
  # "masked": the gradient of x ⊙ M with M held fixed (the paper's Fig. 2 ablation). M is rebuilt from y = x ⊙ M and
  # the thresholds: entries of y and x differ only where M is 0, and there |y| = 0 <= tau_key, kept only as one of
  # the zeros tied at a zero threshold up to `last`, exactly as in x.
  if gradient == "ste":
    return (g,)
  y, tau_key, last = residuals
  key = magnitude_key(y)
  mask = keeps(key, lax.broadcasted_iota(jnp.int32, key.shape, key.ndim - 1), tau_key, last)
  return (jnp.where(mask, g, jnp.zeros_like(g)),)


_sparsify.defvjp(_sparsify_fwd, _sparsify_bwd)


def topk_sparsify(x: jax.Array, k: int, *, gradient: str = "ste", backend: str = "auto",
                  block_sizes: BlockSizes | None = None) -> jax.Array:
  """x ⊙ Topk(|x|): the k largest-magnitude entries of each row kept, the rest zeroed (method.md §1, Eq. 1-2).

  gradient: "ste" (straight-through, Eq. 5) or "masked" (the cotangent times the exact top-K mask, on every
  backend). x: [..., D]; returns x's shape and dtype. block_sizes: the kernel's tiles (default: per chip).
  """
  _check(x, k)
  if gradient not in ("ste", "masked"):
    raise ValueError(f"gradient must be 'ste' or 'masked', got {gradient!r}")
  dispatch.check(backend)  # validate before tracing
  return _sparsify(x, k, gradient, backend, _block_sizes(x, block_sizes))


def _int8_kernel(x, *, k, block_sizes, interpret):
  x_td, restore = _rows(x, block_sizes.block_rows)
  codes, scale = topk_pallas(x_td, k=k, block_sizes=block_sizes, int8=True, interpret=interpret)
  return restore(codes), restore(scale)


def _int8_xla(x, *, k):
  codes, scale = absmax_quantize(x, 8)
  return jnp.where(topk_mask(x, k, exact_zero_ties=False), codes, jnp.zeros_like(codes)), scale


def topk_sparsify_int8(x: jax.Array, k: int, *, backend: str = "auto",
                       block_sizes: BlockSizes | None = None) -> tuple[jax.Array, jax.Array]:
  """(int8 codes [..., D] of x ⊙ Topk(|x|), scale float32 [..., 1]) with x ≈ codes / scale on the kept entries.

  The per-token absmax quantization of method.md §4 (γ = max|x|, which top-K always keeps), fused with selection.
  """
  _check(x, k)
  dispatch.check(backend)
  block_sizes = _block_sizes(x, block_sizes, int8=True)
  return dispatch.select(backend, functools.partial(_int8_kernel, k=k, block_sizes=block_sizes),
                         functools.partial(_int8_xla, k=k), x, kernel_ok=kernel_supported(x.shape, x.dtype))
