"""Which Ws of a sparse_matvecs call the CPU path reads whole above batch 1, as the dense product of the kept entries
scattered into zeros (ops.dense_read), rather than row by row in its loop (issue 20).

Above batch 1 the kept rows of the B rows of x cover most of W (1 - 0.6^B of it at 40% kept: 87% at B = 4, 98% at
B = 8), and the loop reads a row once per row of x that keeps it. Which read wins depends on the CPU. On an Intel
Xeon (AVX-512) XLA's dense product of 8 rows took 2.6 times as long as that of 1 row, and the loop won at batch 8
(TinyLlama's gate|up at 1.65x the dense product) except for k and v, too narrow for a loop step's fixed cost (q|k|v
at 0.67x in the loop, 1.14x with k and v read whole). On an AMD EPYC (Zen 5, AVX-512) the dense product of 8 rows
took 1.34 times as long as that of 1 row, and the loop lost (q|k|v at 0.73x; every W read whole ran fastest).

So where a program is traced under `measuring()` (decode.generate does so when its weights are on the CPU), each
call shape times its candidate reads once, on copies of its Ws (MEASURE_BYTES in all, so that rows come from memory
as a model's layers do), and keeps the fastest for the process. Elsewhere, and for calls too small to split among
threads, the rule `narrow_dense_reads` applies. bfloat16, ternary and packed W always stay in the loop, which
converts or ternarizes only the rows it reads.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DENSE_READ_NARROWNESS = 4  # the rule reads whole a W at most a quarter as wide as the widest of its call
MEASURE_BYTES = 128 * 1024 * 1024
MEASURE_ROUNDS = 5

_MEASURING = contextvars.ContextVar("qsparse_jax_measure_cpu_reads", default=False)
_CHOSEN: dict[tuple, tuple[bool, ...]] = {}


@contextlib.contextmanager
def measuring(enabled: bool = True):
  """Within it, sparse_matvecs calls above batch 1 traced for the CPU choose their reads by measurement (`choose`)."""
  token = _MEASURING.set(enabled)
  try:
    yield
  finally:
    _MEASURING.reset(token)


def dense_readable(w, scale) -> bool:
  """Whether the CPU path may read W whole: float32 weights without a ternary scale (no conversion of W per step)."""
  return jnp.dtype(w.dtype) == jnp.dtype(jnp.float32) and scale is None


def narrow_dense_reads(batch: int, ws_dn, scales) -> tuple[bool, ...]:
  """The rule: above batch 1, read whole each readable W at most 1/DENSE_READ_NARROWNESS as wide as the widest."""
  widest = max(w.shape[1] for w in ws_dn)
  return tuple(batch > 1 and dense_readable(w, s) and w.shape[1] * DENSE_READ_NARROWNESS <= widest
               for w, s in zip(ws_dn, scales))


def candidates(batch: int, ws_dn, scales) -> list[tuple[bool, ...]]:
  """The reads `choose` times, without repeats: all in the loop, the rule's, and every readable W whole."""
  options = [(False,) * len(ws_dn), narrow_dense_reads(batch, ws_dn, scales),
             tuple(batch > 1 and dense_readable(w, s) for w, s in zip(ws_dn, scales))]
  return list(dict.fromkeys(options))


def choose(values_bk, ws_dn, scales, *, matvecs: Callable, small: bool) -> tuple[bool, ...]:
  """Per W, whether the CPU path reads it whole. Under `measuring()`, for a call above batch 1 that is not small,
  the fastest of `candidates` by `measure` (once per shape for the process); else `narrow_dense_reads`.

  matvecs(values_bk, indices_bk, ws_dn, scales, sparse_bd, dense_reads=...) runs the CPU path (jitted)."""
  batch, k = values_bk.shape
  options = candidates(batch, ws_dn, scales)
  if not _MEASURING.get() or small or len(options) == 1:
    return narrow_dense_reads(batch, ws_dn, scales)
  key = (batch, k, tuple((w.shape, jnp.dtype(w.dtype).name) for w in ws_dn), tuple(s is None for s in scales))
  if key not in _CHOSEN:
    with jax.ensure_compile_time_eval():  # runs now, outside the program being traced
      seconds = measure(batch, k, ws_dn, scales, options, matvecs)
    _CHOSEN[key] = options[int(np.argmin(seconds))]
  return _CHOSEN[key]


def measure(batch: int, k: int, ws_dn, scales, options, matvecs: Callable) -> list[float]:
  """Median seconds of each option's reads over copies of the call's Ws (MEASURE_BYTES in all, at least one copy),
  after a warm-up, in MEASURE_ROUNDS rounds that alternate the options. Random kept entries; W of ones (the reads
  are memory-bound: the values do not change the time)."""
  w0 = ws_dn[0]
  input_d = 4 * w0.shape[0] if jnp.dtype(w0.dtype) == jnp.dtype(jnp.uint8) else w0.shape[0]  # packed: 4 per byte
  call_bytes = sum(w.size * jnp.dtype(w.dtype).itemsize for w in ws_dn)
  copies = max(1, MEASURE_BYTES // call_bytes)
  rng = np.random.default_rng(0)
  indices_bk = jnp.asarray(np.sort(rng.permuted(np.tile(np.arange(input_d), (batch, 1)), axis=1)[:, :k], axis=1),
                           jnp.int32)
  values_bk = jnp.asarray(rng.standard_normal((batch, k)), jnp.float32)
  sparse_bd = jnp.zeros((batch, input_d), jnp.float32).at[jnp.arange(batch)[:, None], indices_bk].set(values_bk)
  stacks = tuple(jnp.ones((copies, *w.shape), w.dtype) for w in ws_dn)
  unit_scales = tuple(None if s is None else jnp.float32(1) for s in scales)

  def timed(dense_reads):
    def over_copies(values, indices, sparse_bd, stacks):
      def body(total, ws):
        ys = matvecs(values, indices, ws, unit_scales, sparse_bd, dense_reads=dense_reads)
        return total + sum(y.sum() for y in ys), None
      return lax.scan(body, jnp.float32(0), stacks)[0]
    return jax.jit(over_copies)

  runs = [timed(option) for option in options]
  for run in runs:
    jax.block_until_ready(run(values_bk, indices_bk, sparse_bd, stacks))
  seconds = [[] for _ in runs]
  for _ in range(MEASURE_ROUNDS):
    for run, times in zip(runs, seconds):
      start = time.perf_counter()
      jax.block_until_ready(run(values_bk, indices_bk, sparse_bd, stacks))
      times.append(time.perf_counter() - start)
  return [float(np.median(times)) for times in seconds]
