"""n:m sparse activations times W as a tiled Pallas matmul; the mask is made once per x tile, in VMEM.

Grid (T / bt, N / bn, D / bd), the reduction over D last, a float32 accumulator resident over it. At the first
column block (j = 0) each step masks its x tile [bt, bd] and keeps the result in a VMEM scratch that holds the
whole masked row block [bt, D]; the steps of the later column blocks (j > 0) multiply that scratch and fetch no x
(their x block index stays put). So each x tile is selected once, not once per output tile, and n:m costs one pass
over x per row block and no extra memory traffic: what Block Q-Sparse (method.md §5) was designed for.

The mask ranks every entry inside its group of m consecutive values (m dividing 128: a group never straddles a
128-lane vreg column): for each distance s < m the tile is rotated by s lanes both ways (pltpu.roll, which rotates
like jnp.roll) and each entry counts the group members that `outranks` it (larger magnitude key, or equal and at a
lower index: qsparse_jax.ops.selection, the rule of qsparse_jax.block_topk_mask); it is kept when fewer than n do.
m - 1 rotations per tile replace the cumsum (which Mosaic does not lower) and the 31-step bisection of before.

`nm_select_pallas` is the same selection as a kernel of its own: x ⊙ M, and optionally a second array masked by
x's mask (the masked gradient), for the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch
from qsparse_jax.ops.selection import magnitude_key, outranks

# Preferred tiles (block_t, block_n, block_d) per chip; "v6e" has a 256-wide MXU and twice v5p's VMEM per core.
DEFAULTS_PER_CHIP = {"v5e": (256, 512, 512), "v5p": (256, 512, 512), "v6e": (512, 512, 512)}
DEFAULTS_ELSEWHERE = (256, 256, 256)  # the chip is not known while tracing: tiles that fit every generation


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the n:m matmul (and of its selection kernel, which uses block_t x block_d).

  block_t: rows of x per tile, a multiple of the dtype's sublane tile (8 float32, 16 bfloat16);
  block_n: output columns per tile and block_d: depth per tile, multiples of 128 lanes (block_d also of m), or the
  whole N or D when those are not multiples of 128 (interpret mode only).
  vmem_limit_bytes: Mosaic's scoped VMEM limit (None: its default).
  """

  block_t: int
  block_n: int
  block_d: int
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    for name in ("block_t", "block_n", "block_d"):
      dispatch.check_block("BlockSizes", name, getattr(self, name), multiple=1, why="a tile size")

  def validate(self, dtype, t: int, d: int, n_out: int, m: int) -> None:
    """ValueError unless the tiles respect the TPU tiling of dtype and divide the padded problem [T, D] x [D, N]."""
    owner = "nm_matmul BlockSizes"
    tile = dispatch.sublane_tile(dtype)
    dispatch.check_block(owner, "block_t", self.block_t, multiple=tile,
                         why=f"the sublane tile of {jnp.dtype(dtype).name}")
    for name, size in (("block_n", n_out), ("block_d", d)):
      block = getattr(self, name)
      if block != size:
        dispatch.check_block(owner, name, block, multiple=dispatch.LANES, why="the lane tile")
      if size % block:
        raise ValueError(f"{owner}.{name}={block} must divide {name[-1].upper()}={size}")
    if self.block_d % m:
      raise ValueError(f"{owner}.block_d={self.block_d} must be a multiple of m={m} (whole groups per tile)")
    if t % self.block_t:
      raise ValueError(f"T={t} must be a multiple of block_t={self.block_t} (pad the rows)")

  @classmethod
  def get_default(cls, dtype, t: int, d: int, n_out: int, m: int, *, chip: str | None = None) -> "BlockSizes":
    """The chip's preferred tiles fitted to the problem: block_t shrunk for short inputs (decode), block_n and
    block_d the largest lane multiples (of m too) that divide N and D, and a VMEM limit for the working set."""
    pref_t, pref_n, pref_d = DEFAULTS_PER_CHIP.get(chip, DEFAULTS_ELSEWHERE)
    itemsize = jnp.dtype(dtype).itemsize
    if itemsize == 4:
      pref_t //= 2  # float32: the masked row block [block_t, D] in VMEM is twice as large
    bt = dispatch.row_block(t, pref_t, dispatch.sublane_tile(dtype))
    bn = dispatch.largest_block(n_out, pref_n) or n_out
    bd = dispatch.largest_block(d, pref_d, multiple=max(dispatch.LANES, m)) or d
    working_set = (bt * d * itemsize + 2 * bt * bd * itemsize + 2 * bd * bn * itemsize + bt * bn * 4
                   + 2 * bt * bn * itemsize + 8 * bt * min(bd, dispatch.LANES) * 4)
    return cls(bt, bn, bd, vmem_limit_bytes=dispatch.vmem_limit(working_set))


def group_keep(x_rl: jax.Array, n: int, m: int) -> jax.Array:
  """[R, L] bool: the n entries of largest |x| in each group of m consecutive lanes (L a multiple of m; a group
  never wraps around L), ties to the lower index: qsparse_jax.block_topk_mask's selection, by rank within groups."""
  if n >= m:
    return jnp.ones(x_rl.shape, jnp.bool_)
  key = magnitude_key(x_rl)
  width = key.shape[1]
  lane = lax.broadcasted_iota(jnp.int32, key.shape, 1)
  r = lane & (m - 1) if m & (m - 1) == 0 else lax.rem(lane, jnp.int32(m))  # position inside the group
  outranked = jnp.zeros(key.shape, jnp.int32)
  for s in range(1, m):
    below = pltpu.roll(key, s, 1)  # lane i holds the key of lane i - s (a group member when r >= s)
    above = pltpu.roll(key, width - s, 1)  # lane i holds the key of lane i + s (a group member when r + s < m)
    outranked += ((r >= s) & outranks(below, key, True)).astype(jnp.int32)
    outranked += ((r + s < m) & outranks(above, key, False)).astype(jnp.int32)
  return outranked < n


def _for_each_chunk(bt: int, bd: int, m: int, rows: int, body) -> None:
  """body(row slice, lane slice) over a [bt, bd] tile in chunks of `rows` rows and 128 lanes (all of bd unless
  groups of m tile 128 lanes)."""
  lanes = dispatch.LANES if bd % dispatch.LANES == 0 and dispatch.LANES % m == 0 else bd

  def row_chunk(i, carry):
    row_slice = pl.ds(pl.multiple_of(i * rows, rows), rows)
    for c in range(bd // lanes):
      body(row_slice, pl.ds(c * lanes, lanes))
    return carry

  lax.fori_loop(0, bt // rows, row_chunk, 0)


def _chunk_rows(bt: int, dtype) -> int:
  rows = dispatch.sublane_tile(dtype)
  return rows if bt % rows == 0 else bt


def _matmul_kernel(x_ref, w_ref, out_ref, xs_ref, acc_ref, *, n: int, m: int):
  j, c = pl.program_id(1), pl.program_id(2)
  bt, bd = x_ref.shape

  @pl.when(j == 0)
  def _select():  # once per x tile: the masked tile goes to slot c of the row block's scratch
    tile_ref = xs_ref.at[c]

    def body(rows, lanes):
      x = x_ref[rows, lanes]
      tile_ref[rows, lanes] = jnp.where(group_keep(x, n, m), x, jnp.zeros_like(x))

    _for_each_chunk(bt, bd, m, _chunk_rows(bt, x_ref.dtype), body)

  @pl.when(c == 0)
  def _zero():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(xs_ref[c], w_ref[...], preferred_element_type=jnp.float32)

  @pl.when(c == pl.num_programs(2) - 1)
  def _write():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("n", "m", "block_sizes", "interpret"))
def nm_matmul_pallas(x_td: jax.Array, w_dn: jax.Array, *, n: int, m: int, block_sizes: BlockSizes,
                     interpret: bool = False) -> jax.Array:
  """(x ⊙ M_n:m) W for x_td [T, D] and w_dn [D, N] of one dtype, T a multiple of block_t. Returns [T, N] in that
  dtype, accumulated in float32."""
  t, d = x_td.shape
  n_out = w_dn.shape[1]
  bs = block_sizes
  bs.validate(x_td.dtype, t, d, n_out, m)
  bt, bn, bd = bs.block_t, bs.block_n, bs.block_d
  last_d = d // bd - 1
  return pl.pallas_call(
      functools.partial(_matmul_kernel, n=n, m=m),
      grid=(t // bt, n_out // bn, d // bd),
      # x tile (i, c) while j == 0; afterwards the index stays at the last tile, so nothing is fetched again.
      in_specs=[pl.BlockSpec((bt, bd), lambda i, j, c: (i, jnp.where(j == 0, c, last_d))),
                pl.BlockSpec((bd, bn), lambda i, j, c: (c, j))],
      out_specs=pl.BlockSpec((bt, bn), lambda i, j, c: (i, j)),
      out_shape=jax.ShapeDtypeStruct((t, n_out), x_td.dtype),
      scratch_shapes=[pltpu.VMEM((d // bd, bt, bd), x_td.dtype), pltpu.VMEM((bt, bn), jnp.float32)],
      # The scratch carries a row block's masked x from j == 0 to the later j: only the row axis is parallel.
      compiler_params=dispatch.compiler_params(("parallel", "arbitrary", "arbitrary"), bs.vmem_limit_bytes),
      interpret=dispatch.interpret_mode(interpret),
  )(x_td, w_dn)


def _select_kernel(x_ref, *refs, n: int, m: int):
  """refs: (xs_ref,) or (v_ref, xs_ref, vs_ref): x ⊙ M, and v ⊙ M with x's mask."""
  v_ref, xs_ref, vs_ref = refs if len(refs) == 3 else (None, refs[0], None)
  bt, bd = x_ref.shape

  def body(rows, lanes):
    x = x_ref[rows, lanes]
    keep = group_keep(x, n, m)
    xs_ref[rows, lanes] = jnp.where(keep, x, jnp.zeros_like(x))
    if v_ref is not None:
      v = v_ref[rows, lanes]
      vs_ref[rows, lanes] = jnp.where(keep, v, jnp.zeros_like(v))

  _for_each_chunk(bt, bd, m, _chunk_rows(bt, x_ref.dtype), body)


@functools.partial(jax.jit, static_argnames=("n", "m", "block_sizes", "interpret"))
def nm_select_pallas(x_td: jax.Array, v_td: jax.Array | None = None, *, n: int, m: int, block_sizes: BlockSizes,
                     interpret: bool = False):
  """x_td ⊙ M [T, D] (M the n:m mask of x_td), or (x_td ⊙ M, v_td ⊙ M) when v_td [T, D] is given. T a multiple of
  block_t (of the sublane tiles of both dtypes), D of block_d."""
  t, d = x_td.shape
  bs = block_sizes
  bs.validate(x_td.dtype, t, d, bs.block_n, m)
  if v_td is not None:
    bs.validate(v_td.dtype, t, d, bs.block_n, m)
  tile = pl.BlockSpec((bs.block_t, bs.block_d), lambda i, c: (i, c))
  args = (x_td,) if v_td is None else (x_td, v_td)
  out_shape = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
  out = pl.pallas_call(
      functools.partial(_select_kernel, n=n, m=m),
      grid=(t // bs.block_t, d // bs.block_d),
      in_specs=[tile] * len(args), out_specs=(tile,) * len(args), out_shape=out_shape,
      compiler_params=dispatch.compiler_params(("parallel", "parallel"), bs.vmem_limit_bytes),
      interpret=dispatch.interpret_mode(interpret),
  )(*args)
  return out[0] if v_td is None else out
