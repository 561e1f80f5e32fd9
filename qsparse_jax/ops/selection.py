"""Exact per-row top-K selection by threshold search (the fast path behind `topk_mask`).

Q-Sparse keeps, for every token, the K entries of largest magnitude (method.md §1, M = Topk(|X|)). Sorting every row,
which is what `jax.lax.top_k` does on the CPU, costs more than the matmul the sparse activations feed. Selection only
needs two numbers per row:

    tau_r   a threshold above the (K+1)-th largest magnitude of row r and at most the K-th,
    last_r  the index of the last entry equal to tau_r that is still kept (ties: the lower index wins),

after which the mask is the elementwise expression

    M[r, d] = |x[r, d]| > tau_r  or  (|x[r, d]| == tau_r and d <= last_r).

`row_thresholds` finds both by bisection over the bits of |x| (read as integers, the order of non-negative floats is
the order of their bit patterns), in three exact levels:

    1. the upper 16 bits of the K-th largest key, bisecting over the range the row spans;
    2. the lower 16 bits, among the entries that share those upper bits (skipped for bfloat16 inputs, whose float32
       bit patterns end in 16 zeros);
    3. only if the K-th magnitude is tied: the index of the last tie kept, by bisection over positions.

A block whose rows all have fewer than K magnitudes of 2**-133 or more, like the GLU product after a ReLU², skips
level 1.

Each bisection step is one counting pass over a block of rows; a level stops as soon as every row of the block has a
threshold that keeps exactly its quota, which for continuous data comes well before the bits run out. The passes use
plain float arithmetic on small integers (exact below 2**24) because XLA:CPU vectorizes those reductions and not
compare-and-select ones, and on the CPU the rows are processed in cache-sized blocks so every pass reads from cache.
The result is bit-identical to a stable sort by descending magnitude; `jax.lax.top_k` remains the reference it is
tested against.

The selection specification (the key order, the tie rule and the one `bisect`) is defined once below and imported by
the Pallas kernels: pallas_kernels.topk runs `kth_thresholds` (the same search with fixed-trip loops) and
pallas_kernels.nm_matmul ranks within its n:m groups by `outranks`, so no kernel carries a selection of its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Bytes of float32 magnitudes per row block on the CPU (64 rows of 4096): with the integer-valued copies made from
# them, a block stays in a core's L2 + its share of L3. Measured best of 0.5, 1, 2 and 4 MiB at T = D = 4096.
CPU_BLOCK_BYTES = 2 * 1024 * 1024


def _ge(values, threshold):
  """1.0 where values >= threshold else 0.0, for integer-valued float32 operands (exact below 2**24)."""
  return jnp.minimum(jnp.maximum(values - threshold + 1.0, 0.0), 1.0)


def _eq(values, target):
  """1.0 where values == target else 0.0, for integer-valued float32 operands."""
  return jnp.maximum(1.0 - jnp.abs(values - target), 0.0)


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
  """ceil((lo + hi) / 2) without overflow, for integer or integer-valued float bounds."""
  if jnp.issubdtype(jnp.result_type(lo), jnp.integer):
    return hi - lax.shift_right_logical(hi - lo, jnp.ones_like(hi))
  return hi - jnp.floor((hi - lo) * 0.5)


def bisect(count_ge, need, lo, hi, count_lo, *, steps: int | None = None):
  """The largest t in [lo, hi] with count_ge(t) >= need, or a smaller t whose count is exactly need (which selects
  the same entries). lo must satisfy the condition, with count_lo = count_ge(lo); all arguments are per row.

  Each step halves [lo, hi]. steps=None loops until every row is resolved (a while loop: the XLA path stops as soon
  as its slowest row does); an int runs exactly that many steps (a fixed-trip loop, as Pallas TPU kernels want:
  ceil(log2(hi - lo + 1)) steps resolve every row). Works on int32 keys or on integer-valued float32.
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


def _count_ge(values_rd):
  """count_ge for `bisect` over integer-valued float32 rows [R, D]: thresholds [R] -> counts [R]."""
  return lambda t_r: jnp.sum(_ge(values_rd, t_r[:, None]), axis=-1)


def _block_thresholds(a_rd, k: int, low_bits_zero: bool, exact_zero_ties: bool):
  """Thresholds of one block of rows. a_rd: [R, D] float32 magnitudes. Returns (tau_r f32, last_r i32)."""
  num_rows, dim = a_rd.shape
  key_rd = magnitude_key(a_rd)  # order of |x| == order of its bits
  upper_rd = (key_rd >> 16).astype(jnp.float32)
  k_f = jnp.float32(k)
  positive_upper_r = jnp.sum(_ge(upper_rd, 1.0), axis=-1)  # entries of magnitude >= 2**-133 (bin > 0)

  def level_1(_):
    # The upper 16 bits of the K-th largest key. count(upper >= min) = D >= K: the row minimum is a valid lo.
    lo_r, top_r = jnp.min(upper_rd, axis=-1), jnp.max(upper_rd, axis=-1)
    tau_upper_r = bisect(_count_ge(upper_rd), k_f, lo_r, top_r, jnp.full((num_rows,), float(dim)))
    return tau_upper_r, jnp.sum(_ge(upper_rd, tau_upper_r[:, None] + 1.0), axis=-1)

  def below_normal(_):
    # Every row has fewer than K entries above the first upper-bits bin (the GLU product after a ReLU², say):
    # the K-th magnitude is in bin 0 (zero or below 2**-133), and no search over the upper bits is needed.
    return jnp.zeros((num_rows,), jnp.float32), positive_upper_r

  tau_upper_r, above_r = lax.cond(jnp.all(positive_upper_r < k_f), below_normal, level_1, None)
  in_bin_rd = _eq(upper_rd, tau_upper_r[:, None])
  if low_bits_zero:
    tau_lower_r, at_tau_rd, above_tau_r = jnp.zeros((num_rows,), jnp.float32), in_bin_rd, above_r
  else:
    # Level 2: lower 16 bits, among entries in the upper-bits bin; the others are parked at -1 (never counted).
    lower_rd = (key_rd & 0xFFFF).astype(jnp.float32)
    lower_in_bin_rd = in_bin_rd * (lower_rd + 1.0) - 1.0
    tau_lower_r = bisect(_count_ge(lower_in_bin_rd), k_f - above_r, jnp.zeros((num_rows,)),
                         jnp.maximum(jnp.max(lower_in_bin_rd, axis=-1), 0.0), jnp.sum(in_bin_rd, axis=-1))
    at_tau_rd = _eq(lower_in_bin_rd, tau_lower_r[:, None])
    above_tau_r = above_r + jnp.sum(_ge(lower_in_bin_rd, tau_lower_r[:, None] + 1.0), axis=-1)

  tau_key_r = (tau_upper_r.astype(jnp.int32) << 16) | tau_lower_r.astype(jnp.int32)
  tau_r = lax.bitcast_convert_type(tau_key_r, jnp.float32)
  # Entries strictly above tau are all kept; keep_ties of the entries equal to tau fill the rest.
  keep_ties_r = k_f - above_tau_r
  ties_r = jnp.sum(at_tau_rd, axis=-1)

  # Level 3 (ties only): the position of the keep_ties-th entry equal to tau, counting from the left.
  def last_kept_tie(_):
    pos_rd = lax.broadcasted_iota(jnp.float32, (num_rows, dim), 1)
    # Positions of ties, reversed so that "count(values >= t) >= need" counts ties at positions <= dim - 1 - t.
    rev_rd = at_tau_rd * (dim - pos_rd) - 1.0
    t = bisect(_count_ge(rev_rd), keep_ties_r, jnp.zeros((num_rows,)), jnp.full((num_rows,), float(dim - 1)), ties_r)
    return (dim - 1 - t).astype(jnp.int32)

  needs_tie_break_r = ties_r > keep_ties_r
  if not exact_zero_ties:  # zeros at a zero threshold add nothing to x ⊙ M: keep them all, skip level 3
    needs_tie_break_r &= tau_key_r > 0
  has_ties = jnp.any(needs_tie_break_r)
  last_r = lax.cond(has_ties, last_kept_tie, lambda _: jnp.full((num_rows,), dim - 1, jnp.int32), None)
  if not exact_zero_ties:
    last_r = jnp.where(needs_tie_break_r, last_r, dim - 1)
  return tau_r, last_r


def _rows_per_block(num_rows: int, dim: int) -> int:
  rows = max(8, CPU_BLOCK_BYTES // (8 * dim))
  return min(num_rows, 1 << (rows.bit_length() - 1))


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
  low_bits_zero = zero_key_bits(x.dtype) >= 16  # bfloat16 is the upper half of float32: low key bits are 0
  x_td = x.reshape(-1, dim)
  num_rows = x_td.shape[0]

  def block(x_rd):
    return _block_thresholds(jnp.abs(x_rd.astype(jnp.float32)), k, low_bits_zero, exact_zero_ties)

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
