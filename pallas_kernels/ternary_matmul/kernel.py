"""int8 × packed-ternary matmul as a tiled Pallas kernel; weights stay 2 bits each until they reach VMEM.

Packing (ops.pack_ternary): D = 4Q rows of ternary codes are stored as uint8 [Q, N], byte [q, n] holding rows q,
q + Q, q + 2Q and q + 3Q in its bit pairs 0-1, 2-3, 4-5, 6-7 (0 → 0, 1 → +1, 2 → −1). A tile of bq packed rows thus
unpacks into four plain [bq, bn] planes by shifts and masks, each multiplying its own [bt, bq] slice of the int8
activations: no in-kernel reshape or interleave. Grid (T / bt, N / bn, Q / bq), int32 accumulation resident over
the last axis, scales applied at the last step: y = acc · w_scale / act_scale (method.md §4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def unpack_plane(packed: jax.Array, plane: int) -> jax.Array:
  """int8 {−1, 0, 1} codes held in bit pair `plane` of every byte."""
  bits = (packed.astype(jnp.int32) >> (2 * plane)) & 3
  return jnp.where(bits == 2, -1, bits).astype(jnp.int8)


def _kernel(x0_ref, x1_ref, x2_ref, x3_ref, w_ref, act_scale_ref, w_scale_ref, out_ref, acc_ref):
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  packed = w_ref[...]
  for plane, x_ref in enumerate((x0_ref, x1_ref, x2_ref, x3_ref)):
    acc_ref[...] += jnp.dot(x_ref[...], unpack_plane(packed, plane), preferred_element_type=jnp.int32)

  @pl.when(c == pl.num_programs(2) - 1)
  def _scale():
    out_ref[...] = acc_ref[...].astype(jnp.float32) * (w_scale_ref[0, 0] / act_scale_ref[...])


@functools.partial(jax.jit, static_argnames=("bt", "bn", "bq", "interpret"))
def ternary_matmul_pallas(codes_td: jax.Array, act_scale_t1: jax.Array, packed_qn: jax.Array, w_scale: jax.Array,
                          *, bt: int, bn: int, bq: int, interpret: bool = False) -> jax.Array:
  """codes_td int8 [T, 4Q], act_scale float32 [T, 1], packed uint8 [Q, N], w_scale float32 scalar; T, N, Q
  multiples of bt, bn, bq. Returns float32 [T, N]."""
  t = codes_td.shape[0]
  q, n = packed_qn.shape
  blocks_q = q // bq

  def x_plane(plane):  # columns plane·Q + [c·bq, (c+1)·bq) of the activations
    return pl.BlockSpec((bt, bq), lambda i, j, c, p=plane: (i, p * blocks_q + c))

  return pl.pallas_call(
      _kernel,
      grid=(t // bt, n // bn, blocks_q),
      in_specs=[x_plane(0), x_plane(1), x_plane(2), x_plane(3),
                pl.BlockSpec((bq, bn), lambda i, j, c: (c, j)),
                pl.BlockSpec((bt, 1), lambda i, j, c: (i, 0)),
                pl.BlockSpec(memory_space=pltpu.SMEM)],
      out_specs=pl.BlockSpec((bt, bn), lambda i, j, c: (i, j)),
      out_shape=jax.ShapeDtypeStruct((t, n), jnp.float32),
      scratch_shapes=[pltpu.VMEM((bt, bn), jnp.int32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(codes_td, codes_td, codes_td, codes_td, packed_qn, act_scale_t1.astype(jnp.float32),
    jnp.reshape(w_scale, (1, 1)).astype(jnp.float32))
