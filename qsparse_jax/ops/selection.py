"""Exact per-row top-K selection by threshold search (the fast path behind `topk_mask`).

Q-Sparse keeps, for every token, the K entries of largest magnitude (method.md §1, M = Topk(|X|)). Sorting every row,
which is what `jax.lax.top_k` does on the CPU, costs more than the matmul the sparse activations feed. Selection only
needs two numbers per row:

    tau_r   a threshold above the (K+1)-th largest magnitude of row r and at most the K-th,
    last_r  the index of the last entry equal to tau_r that is still kept (ties: the lower index wins),

after which the mask is the elementwise expression

    M[r, d] = |x[r, d]| > tau_r  or  (|x[r, d]| == tau_r and d <= last_r).

`row_thresholds` finds both by searching over the bits of |x| read as integers (the order of non-negative floats is
the order of their bit patterns):

    1. the key of the K-th largest magnitude, searching [row min, row max] (in units of 2**16 for bfloat16, whose
       float32 bit patterns end in 16 zeros); the search stops as soon as every row of a block has a threshold that
       keeps exactly its quota, which for continuous data comes well before the interval is one key wide;
    2. only if the K-th magnitude is tied: the index of the last tie kept, by a search over positions.

Each search step is one counting pass over a block of rows that tests 4 thresholds at once (see `_counts_ge`), so it
narrows the interval 5x. The passes use integer shifts and sums, which XLA:CPU vectorizes, and on the CPU the rows
are processed in cache-sized blocks so every pass reads from cache. The result is bit-identical to a stable sort by
descending magnitude; `jax.lax.top_k` remains the reference it is tested against.

The selection specification (the key order, the tie rule and the one `bisect`) is defined once below and imported by
the Pallas kernels: pallas_kernels.topk runs `kth_thresholds` (a bit-by-bit bisection with fixed-trip loops) and
pallas_kernels.nm_matmul ranks within its n:m groups by `outranks`, so no kernel carries a selection of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Bytes of int32 keys per row block on the CPU (32 rows of 4096): a block and the sums a counting pass writes stay in
# a core's L2. Measured at T = D = 4096 on an Intel Xeon (AVX-512, 2 MiB of L2 per core): 16, 32, 64 and 128 rows
# took 91, 68, 79 and 88 ms. Blocks are a power of two rows of at least this many bytes: XLA:CPU splits a pass
# between two threads only from 512 KiB (256 KiB each, see pallas_kernels.sparse_matvec.ops), and rows of 1344
# in blocks of 64 (344 KiB) ran on one core: [2048, 1344] took 7.2 ms against 4.7 with 128 rows (AMD EPYC Zen 5).
CPU_BLOCK_BYTES = 512 * 1024


# ------------------------------------------------------------------------------- the selection specification
#
# One definition of what "the K largest |x| of a row, ties to the lower index" means, shared by this module's XLA
# path and the Pallas kernels of pallas_kernels.topk and pallas_kernels.nm_matmul (which import these functions):
#
#   order   magnitude_key: |x| as float32 bit patterns read as int32 (non-negative floats order like their bits);
#   ties    equal keys: the lower index first (`outranks`), or as a mask given a row's threshold (`keeps`);
#   search  `bisect`: the largest t in [lo, hi] with count(key >= t) >= need, halving [lo, hi] once per step.


def magnitude_key(x: jax.Array) -> jax.Array:
  """int32 keys that order |x| exactly: the bit pattern of |x| as float32 (x of any float dtype, same shape)."""
  return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)


def zero_key_bits(dtype) -> int:
  """How many low bits of magnitude_key are 0 for every value of dtype: 16 for bfloat16 (the upper half of a
  float32), 13 for float16, 0 for float32. A search need not decide those bits."""
  nmant = jnp.finfo(dtype).nmant
  return 23 - nmant if nmant < 23 else 0


def outranks(key_a: jax.Array, key_b: jax.Array, a_before_b) -> jax.Array:
  """Whether entry a is selected before entry b: a larger magnitude key, or an equal one at a lower index."""
  return (key_a > key_b) | ((key_a == key_b) & a_before_b)


def keeps(key: jax.Array, pos: jax.Array, tau_key: jax.Array, last: jax.Array) -> jax.Array:
  """The top-K mask of a row given its threshold key tau_key (the K-th largest key, or any key above the (K+1)-th)
  and the index `last` of the last entry equal to tau_key that is kept: `outranks` written with one threshold."""
  return (key > tau_key) | ((key == tau_key) & (pos <= last))


def _midpoint(lo, hi):
  """ceil((lo + hi) / 2) without overflow, for int32 bounds."""
  return hi - lax.shift_right_logical(hi - lo, jnp.ones_like(hi))


def bisect(count_ge, need, lo, hi, count_lo, *, steps: int | None = None):
  """The largest t in [lo, hi] with count_ge(t) >= need, or a smaller t whose count is exactly need (which selects
  the same entries). lo must satisfy the condition, with count_lo = count_ge(lo); all arguments are per row.

  Each step halves [lo, hi]. steps=None loops until every row is resolved (a while loop: the XLA path stops as soon
  as its slowest row does); an int runs exactly that many steps (a fixed-trip loop, as Pallas TPU kernels want:
  ceil(log2(hi - lo + 1)) steps resolve every row). Bounds are int32.
  """

  def step(state):
    lo, hi, count_lo = state
    mid = _midpoint(lo, hi)
    count = count_ge(mid)
    ok = count >= need
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1), jnp.where(ok, count, count_lo)

  def unresolved(state):
    lo, hi, count_lo = state
    return jnp.any((hi > lo) & (count_lo != need))

  state = (lo, hi, count_lo)
  if steps is None:
    lo, _, _ = lax.while_loop(unresolved, step, state)
  else:
    lo, _, _ = lax.fori_loop(0, steps, lambda _, s: step(s), state)
  return lo


def kth_thresholds(key_rd: jax.Array, k: int, *, zero_bits: int = 0) -> tuple[jax.Array, jax.Array]:
  """(tau_key [R, 1], last [R, 1]) of the exact top-k of each row of int32 keys [R, D] (magnitude_key), such that
  keeps(key, pos, tau_key, last) is the mask: with fixed-trip loops, compares, selects and row sums only (the
  form the Pallas TPU top-K kernel runs). zero_bits: low key bits known to be 0 (zero_key_bits), not searched.

  tau_key is the k-th largest key, found bit by bit from bit 30 (31 - zero_bits steps); last is the position of
  the (k - #(key > tau_key))-th entry equal to tau_key, by bisection over positions.
  """
  rows, dim = key_rd.shape

  def count(mask_rd):
    return jnp.sum(mask_rd.astype(jnp.int32), axis=1, keepdims=True)

  top = jnp.full((rows, 1), (2 ** 31 - 1) >> zero_bits, jnp.int32)
  zero = jnp.zeros((rows, 1), jnp.int32)
  tau_bits = bisect(lambda t: count(key_rd >= lax.shift_left(t, jnp.full_like(t, zero_bits))), k, zero, top,
                    jnp.full((rows, 1), dim, jnp.int32), steps=31 - zero_bits)
  tau_key = lax.shift_left(tau_bits, jnp.full_like(tau_bits, zero_bits))
  need = k - count(key_rd > tau_key)  # >= 1 entries equal to tau_key to keep, the lowest positions first
  ties_rd = key_rd == tau_key
  pos_rd = lax.broadcasted_iota(jnp.int32, (rows, dim), 1)
  # Reversed positions: count_ge(t) counts the ties at positions <= dim - 1 - t; the largest such t is the need-th.
  t = bisect(lambda t: count(ties_rd & (pos_rd <= dim - 1 - t)), need, zero, jnp.full((rows, 1), dim - 1, jnp.int32),
             count(ties_rd), steps=max(1, (dim - 1).bit_length()))
  return tau_key, dim - 1 - t


# ------------------------------------------------------------------------------------------- the XLA fast path
#
# A counting pass over a block of rows answers SEARCH_THRESHOLDS thresholds at once: each threshold's 0/1
# indicators are shifted into their own FIELD_BITS-bit field of one int32, summed over chunks of CHUNK entries (a
# chunk's count fits its field), and the fields are unpacked from the chunk sums. On XLA:CPU a pass costs what a
# one-threshold pass costs (writing and reducing the [R, D] sums dominates, not the integer arithmetic), so each
# step of `_search` narrows the interval 5x where a bisection step halves it: about 9 passes per block of normal
# rows instead of 21.

SEARCH_THRESHOLDS = 4
FIELD_BITS = 6
CHUNK = 32
assert CHUNK < 2 ** FIELD_BITS and SEARCH_THRESHOLDS * FIELD_BITS <= 31


def _counts_ge(values_rnc: jax.Array, t_rm: jax.Array) -> jax.Array:
  """counts [R, m] int32 of the entries of each row of values_rnc (int32 [R, N, CHUNK], entries >= -1; -1 pads)
  that are >= t_rm[r, j] (int32 [R, m], thresholds >= 0, m <= SEARCH_THRESHOLDS): one pass for all m.

  values - t cannot overflow for values >= -1 and t >= 0, and its sign bit is 1 exactly where values < t.
  """
  _, num_chunks, chunk = values_rnc.shape
  below_rnc = jnp.zeros_like(values_rnc)
  for j in range(t_rm.shape[1]):
    sign_rnc = lax.shift_right_logical(values_rnc - t_rm[:, j, None, None], jnp.int32(31))
    below_rnc = below_rnc + lax.shift_left(sign_rnc, jnp.int32(FIELD_BITS * j))
  below_rn = jnp.sum(below_rnc, axis=-1)  # [R, N]: every field holds one threshold's count over a chunk
  shifts_m = FIELD_BITS * jnp.arange(t_rm.shape[1], dtype=jnp.int32)
  below_rm = jnp.sum((below_rn[:, :, None] >> shifts_m) & ((1 << FIELD_BITS) - 1), axis=1)
  return num_chunks * chunk - below_rm


def _search(count_ge, need, lo, hi, count_lo):
  """`bisect`'s search, SEARCH_THRESHOLDS + 1-ary: (t, count_ge(t), count_ge(hi_end + 1)) per row [R] int32, where t
  is the largest value in [lo, hi] with count_ge(t) >= need, or a smaller one whose count is exactly need (which
  keeps the same entries), and hi_end the last upper bound (== t for a row the search ran to its end).

  count_ge maps int32 thresholds [R, m] >= 0 to counts [R, m]; lo must satisfy the condition, count_lo =
  count_ge(lo), and count_ge(hi + 1) < need is taken as 0 until a step measures it. Each step splits (lo, hi] at m
  thresholds; a row with lo == 0 tests 1 first, so a row whose K-th magnitude is 0 (a ReLU² GLU product) ends in
  one step. Loops until every row of the block is resolved.
  """
  m = SEARCH_THRESHOLDS
  j_m = jnp.arange(1, m + 1, dtype=jnp.int32)

  def step(state):
    lo, hi, count_lo, count_above, _ = state
    width = hi - lo  # the m thresholds split (lo, hi] near evenly, without overflowing int32
    t = lo[:, None] + (width // (m + 1))[:, None] * j_m + ((width % (m + 1) + 1)[:, None] * j_m) // (m + 1)
    first = jnp.minimum(hi, 1)[:, None]
    t = jnp.where((lo == 0)[:, None], jnp.where(j_m == 1, first, jnp.maximum(t, first)), t)
    count = count_ge(t)
    ok = count >= need[:, None]  # a prefix of the thresholds: t ascends and count descends
    lo = jnp.max(jnp.where(ok, t, lo[:, None]), axis=-1)
    hi = jnp.min(jnp.where(ok, hi[:, None], t - 1), axis=-1)
    count_lo = jnp.min(jnp.where(ok, count, count_lo[:, None]), axis=-1)
    count_above = jnp.max(jnp.where(ok, count_above[:, None], count), axis=-1)
    return lo, hi, count_lo, count_above, jnp.any((hi > lo) & (count_lo != need))

  # The stop test is computed in the step (the loop's condition only reads it), so it fuses with the step's own ops.
  lo, _, count_lo, count_above, _ = lax.while_loop(lambda state: state[-1], step,
                                                   (lo, hi, count_lo, jnp.zeros_like(count_lo), jnp.bool_(True)))
  return lo, count_lo, count_above


def _block_thresholds(x_rd, k: int, zero_bits: int, exact_zero_ties: bool):
  """Thresholds of one block of rows. x_rd: [R, D] float. Returns (tau_r float32, last_r int32)."""
  num_rows, dim = x_rd.shape
  key_rd = magnitude_key(x_rd) >> zero_bits  # in units of the lowest key bit dtype can set
  pad = (-dim) % CHUNK
  key_rnc = jnp.pad(key_rd, ((0, 0), (0, pad)), constant_values=-1).reshape(num_rows, -1, CHUNK)
  need_r = jnp.full((num_rows,), k, jnp.int32)
  # count_ge(min) = D >= K: the row minimum is a valid lo.
  tau_r, count_r, above_r = _search(lambda t: _counts_ge(key_rnc, t), need_r, jnp.min(key_rd, axis=-1),
                                    jnp.max(key_rd, axis=-1), jnp.full((num_rows,), dim, jnp.int32))
  # count_r == K: the entries >= tau are the top-K. count_r > K: tau is the K-th key, tied; the search ran to its
  # end, so above_r counts the keys > tau, all kept, and K - above_r of the ties fill the rest.
  needs_tie_break_r = count_r > k
  if not exact_zero_ties:  # zeros at a zero threshold add nothing to x ⊙ M: keep them all, skip the tie search
    needs_tie_break_r &= tau_r > 0

  def last_kept_tie(_):
    # The position of the (K - above)-th tie from the left. rev = D - position on ties (1..D), 0 elsewhere:
    # count(rev >= s) counts the ties at positions <= D - s; the largest s with count >= K - above is the answer.
    pos_rnc = lax.broadcasted_iota(jnp.int32, key_rnc.shape, 1) * CHUNK + lax.broadcasted_iota(
        jnp.int32, key_rnc.shape, 2)
    rev_rnc = jnp.where(key_rnc == tau_r[:, None, None], dim - pos_rnc, 0)
    ties_r = count_r - above_r
    keep_r = jnp.where(needs_tie_break_r, k - above_r, ties_r)
    s_r, _, _ = _search(lambda t: _counts_ge(rev_rnc, t), keep_r, jnp.ones_like(keep_r),
                        jnp.full((num_rows,), dim, jnp.int32), ties_r)
    return jnp.where(needs_tie_break_r, dim - s_r, dim - 1)

  last_r = lax.cond(jnp.any(needs_tie_break_r), last_kept_tie, lambda _: jnp.full((num_rows,), dim - 1, jnp.int32),
                    None)
  return lax.bitcast_convert_type(tau_r << zero_bits, jnp.float32), last_r


def _rows_per_block(num_rows: int, dim: int) -> int:
  """The fewest rows, a power of two and at least 8, whose keys fill CPU_BLOCK_BYTES (at most num_rows)."""
  rows = max(8, -(-CPU_BLOCK_BYTES // (4 * dim)))
  return min(num_rows, 1 << (rows - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("k", "exact_zero_ties"))
def row_thresholds(x: jax.Array, k: int, *, exact_zero_ties: bool = True) -> tuple[jax.Array, jax.Array]:
  """Per-row threshold and last kept tie of the exact top-K of |x| along the last axis.

  Implements the selection of M = Topk(|X|) (Q-Sparse eq. in method.md §1) without sorting.

  Args:
    x: [..., D] float array (any float dtype; selection runs on float32 magnitudes).
    k: number of entries to keep per row, 1 <= k <= D.
    exact_zero_ties: if False, a row whose K-th magnitude is 0 keeps all of its zeros (more than k entries, yet the
      same x ⊙ M), which skips the tie-breaking search; for callers that need the values, not the mask.

  Returns:
    tau: [...] float32 per-row threshold with v_(k+1) < tau <= v_k, where v_i is the i-th largest |x| of the row
      (tau == v_k when the K-th magnitude is tied).
    last: [...] int32, the largest index d with |x[d]| == tau that is kept; the mask is
      (|x| > tau) | ((|x| == tau) & (d <= last)).
  """
  dim = x.shape[-1]
  x_td = x.reshape(-1, dim)
  num_rows = x_td.shape[0]

  def block(x_rd):
    return _block_thresholds(x_rd, k, zero_key_bits(x.dtype), exact_zero_ties)

  def blocked(x_td):
    # Cache-sized row blocks, one after another: every bisection pass then reads from cache (CPU).
    rows = _rows_per_block(num_rows, dim)
    pad = (-num_rows) % rows
    if pad:
      x_td = jnp.pad(x_td, ((0, pad), (0, 0)))
    tau_nr, last_nr = lax.map(block, x_td.reshape(-1, rows, dim))
    return tau_nr.reshape(-1)[:num_rows], last_nr.reshape(-1)[:num_rows]

  tau_t, last_t = lax.platform_dependent(x_td, cpu=blocked, default=block)
  return tau_t.reshape(x.shape[:-1]), last_t.reshape(x.shape[:-1])


def mask_from_thresholds(x: jax.Array, tau: jax.Array, last: jax.Array) -> jax.Array:
  """The boolean top-K mask [..., D] of x: [..., D] given `row_thresholds(x, k)`; fuses into its consumer under jit.

  Compares bit patterns rather than floats, so subnormal magnitudes order exactly even where the CPU flushes them.
  """
  key = magnitude_key(x)
  tau_key = lax.bitcast_convert_type(tau, jnp.int32)[..., None]
  return keeps(key, lax.broadcasted_iota(jnp.int32, key.shape, key.ndim - 1), tau_key, last[..., None])
