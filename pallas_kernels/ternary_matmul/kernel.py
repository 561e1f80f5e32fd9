"""int8 × packed-ternary matmul as a tiled Pallas kernel; weights stay 2 bits each until they reach VMEM.

Packing (ops.pack_ternary): D = 4Q rows of ternary codes are stored as uint8 [Q, N], byte [q, n] holding rows q,
q + Q, q + 2Q and q + 3Q in its bit pairs 0-1, 2-3, 4-5, 6-7 (0 → 0, 1 → +1, 2 → −1). A tile of bq packed rows thus
unpacks into four plain [bq, bn] planes by shifts and masks, each multiplying its own [bt, bq] slice of the int8
activations, which come as planes [4, T, Q] (columns p·Q + [0, Q) of plane p: ops.py transposes them, a copy of the
activations only, so Q need not be a multiple of 128, as for D = 11008): no in-kernel reshape or interleave. Grid
(T / bt, N / bn, Q / bq), int32 accumulation resident over the last axis, scales applied at the last step:
y = acc · w_scale / act_scale (method.md §4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch

# Preferred (block_t, block_n, block_q) per chip; v6e has a 256-wide MXU and twice v5p's VMEM per core.
DEFAULTS_PER_CHIP = {"v5e": (256, 512, 512), "v5p": (256, 512, 512), "v6e": (512, 512, 512)}
DEFAULTS_ELSEWHERE = (256, 256, 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the ternary matmul: block_t rows of int8 codes, block_n output columns, block_q packed rows.

  block_t is a multiple of 32 (the int8 sublane tile) or the whole T; block_n and block_q are multiples of 128 that
  divide N and Q (the uint8 packed block is [block_q, block_n]; the code planes block is [4, block_t, block_q]), or
  N and Q themselves. vmem_limit_bytes: Mosaic's scoped VMEM limit (None: its default).
  """

  block_t: int
  block_n: int
  block_q: int
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    for name in ("block_t", "block_n", "block_q"):
      dispatch.check_block("BlockSizes", name, getattr(self, name), multiple=1, why="a tile size")

  def validate(self, t: int, q: int, n_out: int) -> None:
    """ValueError unless the tiles divide the (padded) problem and respect the int8 and lane tiling."""
    owner = "ternary_matmul BlockSizes"
    if self.block_t != t:
      dispatch.check_block(owner, "block_t", self.block_t, multiple=dispatch.sublane_tile(jnp.int8),
                           why="the sublane tile of the int8 codes")
    for name, size in (("block_n", n_out), ("block_q", q)):
      if getattr(self, name) != size:
        dispatch.check_block(owner, name, getattr(self, name), multiple=dispatch.LANES, why="the lane tile")
    if t % self.block_t or n_out % self.block_n or q % self.block_q:
      raise ValueError(f"{owner} ({self.block_t}, {self.block_n}, {self.block_q}) must divide T={t} (pad the "
                       f"rows), N={n_out} and Q={q}")

  @classmethod
  def get_default(cls, t: int, q: int, n_out: int, *, chip: str | None = None) -> "BlockSizes":
    """The chip's preferred tiles fitted to the problem: all of T when it is short (decode), else block_t rows
    with T padded to them; block_n and block_q the largest multiples of 128 dividing N and Q (or N and Q)."""
    pref_t, pref_n, pref_q = DEFAULTS_PER_CHIP.get(chip, DEFAULTS_ELSEWHERE)
    bt = t if t < dispatch.sublane_tile(jnp.int8) else dispatch.row_block(t, pref_t, dispatch.sublane_tile(jnp.int8))
    return cls(bt, dispatch.largest_block(n_out, pref_n) or n_out, dispatch.largest_block(q, pref_q) or q)


def unpack_plane(packed: jax.Array, plane: int) -> jax.Array:
  """int8 {−1, 0, 1} codes held in bit pair `plane` of every byte."""
  bits = (packed.astype(jnp.int32) >> (2 * plane)) & 3
  return jnp.where(bits == 2, -1, bits).astype(jnp.int8)


def _kernel(planes_ref, w_ref, act_scale_ref, w_scale_ref, out_ref, acc_ref):
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  packed = w_ref[...]
  for plane in range(4):
    acc_ref[...] += jnp.dot(planes_ref[plane], unpack_plane(packed, plane), preferred_element_type=jnp.int32)

  @pl.when(c == pl.num_programs(2) - 1)
  def _scale():
    out_ref[...] = acc_ref[...].astype(jnp.float32) * (w_scale_ref[0, 0] / act_scale_ref[...])


def code_planes(codes_td: jax.Array, q: int) -> jax.Array:
  """int8 codes [T, 4Q] as the kernel's planes [4, T, Q]: plane p holds columns p·Q + [0, Q)."""
  return codes_td.reshape(codes_td.shape[0], 4, q).transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def ternary_matmul_pallas(planes_ptq: jax.Array, act_scale_t1: jax.Array, packed_qn: jax.Array, w_scale: jax.Array,
                          *, block_sizes: BlockSizes, interpret: bool = False) -> jax.Array:
  """planes_ptq int8 [4, T, Q] (code_planes), act_scale float32 [T, 1], packed uint8 [Q, N], w_scale float32
  scalar; T, N, Q multiples of the block sizes. Returns float32 [T, N]."""
  t = planes_ptq.shape[1]
  q, n = packed_qn.shape
  block_sizes.validate(t, q, n)
  bt, bn, bq = block_sizes.block_t, block_sizes.block_n, block_sizes.block_q
  return pl.pallas_call(
      _kernel,
      grid=(t // bt, n // bn, q // bq),
      in_specs=[pl.BlockSpec((4, bt, bq), lambda i, j, c: (0, i, c)),
                pl.BlockSpec((bq, bn), lambda i, j, c: (c, j)),
                pl.BlockSpec((bt, 1), lambda i, j, c: (i, 0)),
                pl.BlockSpec(memory_space=pltpu.SMEM)],
      out_specs=pl.BlockSpec((bt, bn), lambda i, j, c: (i, j)),
      out_shape=jax.ShapeDtypeStruct((t, n), jnp.float32),
      scratch_shapes=[pltpu.VMEM((bt, bn), jnp.int32)],
      compiler_params=dispatch.compiler_params(("parallel", "parallel", "arbitrary"), block_sizes.vmem_limit_bytes),
      interpret=dispatch.interpret_mode(interpret),
  )(planes_ptq, packed_qn, act_scale_t1.astype(jnp.float32), jnp.reshape(w_scale, (1, 1)).astype(jnp.float32))
