"""Public entry: nm_matmul(x, W, n, m) = (x ⊙ M_n:m) W, differentiable, with one semantics on every backend.

Backends (pallas_kernels.dispatch.select): on a TPU the fused kernel of kernel.py for the inputs `kernel_supported`
accepts (or backend="pallas"); elsewhere, and for other inputs, XLA: qsparse_jax.block_topk_mask fused into the
dot's operand (the CPU's fast path, and GPUs'). The backward pass is the same in both, with the mask made by the
same backend (kernel.nm_select_pallas on a TPU, block_topk_mask elsewhere) and bfloat16 operands multiplied with
float32 accumulation (method.md §2, §5):

    dW = (x ⊙ M)ᵀ g;   dx = g Wᵀ ("ste", the straight-through estimator of Eq. 5)   or   (g Wᵀ) ⊙ M ("masked").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import dispatch
from pallas_kernels.nm_matmul.kernel import BlockSizes, nm_matmul_pallas, nm_select_pallas
from qsparse_jax.ops import block_topk_mask

PALLAS_PLATFORMS = ("tpu",)
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)
MAX_KERNEL_DEPTH = 16384  # the masked row block [block_t, D] stays in VMEM; compiled up to this depth


def kernel_supported(x_shape: tuple[int, ...], w_shape: tuple[int, ...], x_dtype, w_dtype, m: int) -> bool:
  """Whether "auto" runs the kernel on a TPU: x and W of one dtype, float32 or bfloat16; D and N multiples of 128
  (D at most MAX_KERNEL_DEPTH); m dividing 128 (2:4, 8:16, 16:32, ...: compiled for v5p and v6e in
  tests/test_tpu_compile.py)."""
  d, n_out = w_shape
  return (jnp.dtype(x_dtype) == jnp.dtype(w_dtype) and jnp.dtype(x_dtype) in map(jnp.dtype, KERNEL_DTYPES)
          and d % dispatch.LANES == 0 and n_out % dispatch.LANES == 0 and d <= MAX_KERNEL_DEPTH
          and dispatch.LANES % m == 0)


def _pad_rows(a_td, rows):
  return jnp.pad(a_td, ((0, dispatch.round_up(a_td.shape[0], rows) - a_td.shape[0]), (0, 0)))


def _kernel_forward(x_td, w_dn, *, n, m, block_sizes, interpret):
  y = nm_matmul_pallas(_pad_rows(x_td, block_sizes.block_t), w_dn, n=n, m=m, block_sizes=block_sizes,
                       interpret=interpret)
  return y[:x_td.shape[0]]


def _xla_forward(x_td, w_dn, *, n, m):
  # Zeros tied at a zero threshold may all count as kept here: x ⊙ M is the same.
  xs = jnp.where(block_topk_mask(x_td, n, m, exact_zero_ties=False), x_td, jnp.zeros_like(x_td))
  return jnp.dot(xs, w_dn, preferred_element_type=jnp.float32).astype(x_td.dtype)


def _kernel_select(x_td, *v_td, n, m, block_sizes, interpret):
  t = x_td.shape[0]
  padded = [_pad_rows(a, block_sizes.block_t) for a in (x_td, *v_td)]
  out = nm_select_pallas(*padded, n=n, m=m, block_sizes=block_sizes, interpret=interpret)
  return out[:t] if not v_td else tuple(a[:t] for a in out)


def _xla_select(x_td, *v_td, n, m):
  keep = block_topk_mask(x_td, n, m)  # exact: the masked gradient reads it
  out = [jnp.where(keep, a, jnp.zeros_like(a)) for a in (x_td, *v_td)]
  return out[0] if not v_td else tuple(out)


def _select(backend, block_sizes, n, m, x_td, *v_td):
  """x ⊙ M, or (x ⊙ M, v ⊙ M), on the backend of the forward pass."""
  return dispatch.select(backend, functools.partial(_kernel_select, n=n, m=m, block_sizes=block_sizes),
                         functools.partial(_xla_select, n=n, m=m), x_td, *v_td,
                         kernel_ok=kernel_supported(x_td.shape, (x_td.shape[1], dispatch.LANES), x_td.dtype,
                                                    x_td.dtype, m))


def _forward(x_td, w_dn, n, m, backend, block_sizes):
  return dispatch.select(backend, functools.partial(_kernel_forward, n=n, m=m, block_sizes=block_sizes),
                         functools.partial(_xla_forward, n=n, m=m), x_td, w_dn,
                         kernel_ok=kernel_supported(x_td.shape, w_dn.shape, x_td.dtype, w_dn.dtype, m))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _nm_matmul(x_td, w_dn, n, m, gradient, backend, block_sizes):
  return _forward(x_td, w_dn, n, m, backend, block_sizes)


def _fwd(x_td, w_dn, n, m, gradient, backend, block_sizes):
  return _forward(x_td, w_dn, n, m, backend, block_sizes), (x_td, w_dn)


def _bwd(n, m, gradient, backend, block_sizes, saved, g_tn):
  x_td, w_dn = saved
  dx = lax.dot_general(g_tn, w_dn, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x_td.dtype)
  if gradient == "masked":
    xs, dx = _select(backend, block_sizes, n, m, x_td, dx)
  else:
    xs = _select(backend, block_sizes, n, m, x_td)
  dw = lax.dot_general(xs, g_tn, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx, dw.astype(w_dn.dtype)


_nm_matmul.defvjp(_fwd, _bwd)


def nm_matmul(x: jax.Array, w_dn: jax.Array, n: int, m: int, *, gradient: str = "ste", backend: str = "auto",
              block_sizes: BlockSizes | None = None) -> jax.Array:
  """(x ⊙ M) W where M keeps the n largest |x| in every m consecutive values of each row (Block Q-Sparse, §5).

  x: [..., D] (D a multiple of m), w_dn: [D, N]; both are cast to their promoted dtype, which the result has
  (accumulated in float32). gradient: "ste" or "masked" (see the module docstring). block_sizes: the kernel's
  tiles (default: per chip, fitted to the shapes).
  """
  if x.ndim < 1 or w_dn.ndim != 2 or x.shape[-1] != w_dn.shape[0]:
    raise ValueError(f"expected x [..., D] and W [D, N] with the same D, got {x.shape} and {w_dn.shape}")
  if not 0 < n <= m or x.shape[-1] % m:
    raise ValueError(f"n:m must have 0 < n <= m and m dividing D={x.shape[-1]}, got {n}:{m}")
  if gradient not in ("ste", "masked"):
    raise ValueError(f"gradient must be 'ste' or 'masked', got {gradient!r}")
  dispatch.check(backend)
  dtype = jnp.promote_types(x.dtype, w_dn.dtype)
  x_td = x.reshape(-1, x.shape[-1]).astype(dtype)
  t, d = x_td.shape
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(dtype, t, d, w_dn.shape[1], m, chip=dispatch.chip_name())
  elif not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a pallas_kernels.nm_matmul BlockSizes, got {block_sizes!r}")
  else:
    block_sizes.validate(dtype, dispatch.round_up(t, block_sizes.block_t), d, w_dn.shape[1], m)
  y = _nm_matmul(x_td, w_dn.astype(dtype), n, m, gradient, backend, block_sizes)
  return y.reshape(*x.shape[:-1], w_dn.shape[1])
