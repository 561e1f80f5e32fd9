"""Pure-jnp reference: (x ⊙ M_n:m) W with the library's Block Q-Sparse mask."""

import jax
import jax.numpy as jnp

from qsparse_jax.ops import block_topk_mask


def nm_matmul_reference(x_td: jax.Array, w_dn: jax.Array, n: int, m: int) -> jax.Array:
  """x_td [T, D], w_dn [D, N]; the n largest |x| of every m consecutive values of a row kept. float32 [T, N]."""
  xs = jnp.where(block_topk_mask(x_td, n, m), x_td, jnp.zeros_like(x_td))
  return jnp.dot(xs.astype(jnp.float32), w_dn.astype(jnp.float32))
