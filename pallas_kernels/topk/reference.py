"""Pure-jnp references, written with the library's own operators (qsparse_jax.topk_mask, absmax_quantize)."""

import jax
import jax.numpy as jnp

from qsparse_jax.ops import absmax_quantize, topk_mask


def topk_sparsify_reference(x_td: jax.Array, k: int) -> jax.Array:
  """x ⊙ Topk(|x|) per row (method.md §1, Eq. 1-2)."""
  return jnp.where(topk_mask(x_td, k), x_td, jnp.zeros_like(x_td))


def topk_sparsify_int8_reference(x_td: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(int8 codes of x ⊙ Topk(|x|), per-row scale Qp / (γ + ε)) with γ = max|x| (method.md §4)."""
  codes, scale = absmax_quantize(x_td, 8)
  return jnp.where(topk_mask(x_td, k), codes, jnp.zeros_like(codes)), scale
