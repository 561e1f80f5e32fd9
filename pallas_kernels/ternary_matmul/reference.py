"""Pure-jnp reference: unpack the weights and multiply in int32."""

import jax
import jax.numpy as jnp

from pallas_kernels.ternary_matmul.ops import unpack_ternary


def ternary_matmul_reference(codes_td: jax.Array, act_scale_t1: jax.Array, packed_qn: jax.Array,
                             w_scale: jax.Array) -> jax.Array:
  """(codes · W_q) · w_scale / act_scale in float32, W_q the unpacked {−1, 0, 1} weights [D, N]."""
  acc = jnp.dot(codes_td.astype(jnp.int32), unpack_ternary(packed_qn).astype(jnp.int32))
  return acc.astype(jnp.float32) * (w_scale / act_scale_t1)
