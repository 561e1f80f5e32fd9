"""RMSNorm (Llama's), computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qsparse_jax.nn.linear import logical_axes


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · scale over the last axis, computed in float32 (Llama's RMSNorm)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # no random state; accepted for a uniform constructor
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical_axes(("embed",)))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)
