"""Top-K selection as a Pallas kernel: one block of rows per grid step, the whole row width in VMEM.

Per row it finds, without sorting, the K-th largest |x| as an int32 bit pattern by bisection from the top bit
(31 count passes: for non-negative floats the bit patterns order like the values), then the position of the last
tie to keep by a second bisection over positions (ties go to the lower index, as in qsparse_jax.topk_mask). Only
compares, selects and row sums: it lowers through Mosaic TPU. Optionally quantizes the kept values to int8 with the
row's absmax scale in the same pass (method.md §4), the input of the ternary matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

EPS = 1e-5  # qsparse_jax.ops.sparsity.EPS
QP = 127.0


def _row_mask(x_td: jax.Array, k: int) -> jax.Array:
  t, d = x_td.shape
  key = lax.bitcast_convert_type(jnp.abs(x_td.astype(jnp.float32)), jnp.int32)

  def count(m):
    return jnp.sum(m.astype(jnp.int32), axis=1, keepdims=True)

  def value_bit(i, tau):  # largest pattern tau with #(key >= tau) >= k, one bit at a time from bit 30
    candidate = tau | lax.shift_left(jnp.int32(1), 30 - i)
    return jnp.where(count(key >= candidate) >= k, candidate, tau)

  tau = lax.fori_loop(0, 31, value_bit, jnp.zeros((t, 1), jnp.int32))
  need = k - count(key > tau)  # >= 1 ties at tau to keep, the lowest positions first
  ties = key == tau
  pos = lax.broadcasted_iota(jnp.int32, (t, d), 1)
  pos_bits = max(1, (d - 1).bit_length())

  def position_bit(i, last):  # largest position p with #(ties at positions < p) < need: the need-th tie
    candidate = last | lax.shift_left(jnp.int32(1), pos_bits - 1 - i)
    return jnp.where(count(ties & (pos < candidate)) < need, candidate, last)

  last = lax.fori_loop(0, pos_bits, position_bit, jnp.zeros((t, 1), jnp.int32))
  return (key > tau) | (ties & (pos <= last))


def _sparsify_kernel(x_ref, out_ref, *, k: int):
  x = x_ref[...]
  out_ref[...] = jnp.where(_row_mask(x, k), x, jnp.zeros_like(x))


def _int8_kernel(x_ref, codes_ref, scale_ref, *, k: int):
  x32 = x_ref[...].astype(jnp.float32)
  scale = QP / (jnp.max(jnp.abs(x32), axis=1, keepdims=True) + EPS)
  codes = jnp.clip(jnp.round(x32 * scale), -QP - 1.0, QP)
  codes_ref[...] = jnp.where(_row_mask(x32, k), codes, 0.0).astype(jnp.int8)
  scale_ref[...] = scale


@functools.partial(jax.jit, static_argnames=("k", "bt", "int8", "interpret"))
def topk_pallas(x_td: jax.Array, *, k: int, bt: int, int8: bool = False, interpret: bool = False):
  """x_td: [T, D] with T a multiple of bt. Returns x ⊙ Topk(|x|) [T, D], or (int8 codes [T, D], scale f32 [T, 1])."""
  t, d = x_td.shape
  rows = pl.BlockSpec((bt, d), lambda i: (i, 0))
  if int8:
    kernel = functools.partial(_int8_kernel, k=k)
    out_shape = (jax.ShapeDtypeStruct((t, d), jnp.int8), jax.ShapeDtypeStruct((t, 1), jnp.float32))
    out_specs = (rows, pl.BlockSpec((bt, 1), lambda i: (i, 0)))
  else:
    kernel = functools.partial(_sparsify_kernel, k=k)
    out_shape, out_specs = jax.ShapeDtypeStruct((t, d), x_td.dtype), rows
  return pl.pallas_call(
      kernel, grid=(t // bt,), in_specs=[rows], out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(x_td)
