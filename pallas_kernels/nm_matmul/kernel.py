"""n:m sparse activations times W as a tiled Pallas matmul: the mask is made on each x tile, in VMEM.

Grid (T / bt, N / bn, D / bd), bd a multiple of m, the reduction over D last with the float32 output tile resident.
Each step views its x tile [bt, bd] as [bt, bd / m, m] groups, finds every group's n-th largest |x| by bisection
over float32 bit patterns (as the top-K kernel does per row), keeps the n largest (ties to the lower index), and
multiplies the masked tile with the W tile. The selection never leaves the tile, so n:m costs one extra pass over x
per tile and no extra memory traffic: what Block Q-Sparse (method.md §5) was designed for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def group_mask(x_tgm: jax.Array, n: int) -> jax.Array:
  """[T, G, m] bool: the n largest |x| of each group (last axis), ties to the lower index."""
  key = lax.bitcast_convert_type(jnp.abs(x_tgm.astype(jnp.float32)), jnp.int32)

  def count(mask):
    return jnp.sum(mask.astype(jnp.int32), axis=-1, keepdims=True)

  def value_bit(i, tau):
    candidate = tau | lax.shift_left(jnp.int32(1), 30 - i)
    return jnp.where(count(key >= candidate) >= n, candidate, tau)

  tau = lax.fori_loop(0, 31, value_bit, jnp.zeros(key.shape[:-1] + (1,), jnp.int32))
  need = n - count(key > tau)
  ties = key == tau
  rank = jnp.cumsum(ties.astype(jnp.int32), axis=-1)  # 1-based rank among the ties, lowest position first
  return (key > tau) | (ties & (rank <= need))


def _kernel(x_ref, w_ref, out_ref, *, n: int, m: int):
  @pl.when(pl.program_id(2) == 0)
  def _zero():
    out_ref[...] = jnp.zeros_like(out_ref)

  x = x_ref[...]
  bt, bd = x.shape
  x_tgm = x.reshape(bt, bd // m, m)
  xs = jnp.where(group_mask(x_tgm, n), x_tgm, jnp.zeros_like(x_tgm)).reshape(bt, bd)
  out_ref[...] += jnp.dot(xs.astype(w_ref.dtype), w_ref[...], preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("n", "m", "bt", "bn", "bd", "interpret"))
def nm_matmul_pallas(x_td: jax.Array, w_dn: jax.Array, *, n: int, m: int, bt: int, bn: int, bd: int,
                     interpret: bool = False) -> jax.Array:
  """x_td [T, D] and w_dn [D, N] with T, N, D multiples of bt, bn, bd (bd of m). Returns float32 [T, N]."""
  t, d = x_td.shape
  out_n = w_dn.shape[1]
  return pl.pallas_call(
      functools.partial(_kernel, n=n, m=m),
      grid=(t // bt, out_n // bn, d // bd),
      in_specs=[pl.BlockSpec((bt, bd), lambda i, j, c: (i, c)), pl.BlockSpec((bd, bn), lambda i, j, c: (c, j))],
      out_specs=pl.BlockSpec((bt, bn), lambda i, j, c: (i, j)),
      out_shape=jax.ShapeDtypeStruct((t, out_n), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(x_td, w_dn)
