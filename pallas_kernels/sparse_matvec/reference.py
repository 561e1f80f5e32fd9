"""Pure-jnp reference: y[b] = Σ_j values[b, j] · W[indices[b, j]], accumulated in float32."""

import jax
import jax.numpy as jnp


def sparse_matvec_reference(values_bk: jax.Array, indices_bk: jax.Array, w_dn: jax.Array) -> jax.Array:
  """values_bk, indices_bk: [B, K] kept activations and their positions in [0, D); w_dn: [D, N]. Returns f32 [B, N].

  Equal to the dense (x ⊙ M) W when x ⊙ M has values_bk at indices_bk and zeros elsewhere.
  """
  rows_bkn = jnp.take(w_dn, indices_bk, axis=0).astype(jnp.float32)
  return jnp.einsum("bk,bkn->bn", values_bk.astype(jnp.float32), rows_bkn)
