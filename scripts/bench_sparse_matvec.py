"""Sparse decode matvec against the dense one (issue: kernels; target >= 2.0 at 40% kept, batch 1, CPU).

In one process, float32, W: [D, N] = [4096, 11008] (a 7B model's up projection):
  dense   x @ W for x [B, D]
  sparse  pallas_kernels.sparse_matvec(values, indices, W) with the kept 40% of each row of x (backend "auto":
          the XLA fast path on the CPU, the Pallas kernel on TPU)
  select  topk_values_indices(x, K) + sparse: the whole sparse projection, selection included
As in decoding, where each token's projections run back to back and read weights no cache holds, each timing is a
burst of calls, one per copy of W (--copies 4 different matrices: 720 MB, beyond the last-level cache of the
machines measured, up to 480 MB); a pause before each burst, so that neither side pays for the other's worker
threads. After warm-up, rounds alternate dense and sparse; each figure is the median over rounds of dense / sparse.
Batches 8 and 16 are printed for reference (each row keeps its own 40%, so the rows of W read grow with the batch).
The last line is `sparse_matvec_vs_dense: <median speedup at batch 1>`.

    python scripts/bench_sparse_matvec.py [--dim 4096] [--out 11008] [--keep 0.4] [--rounds 15] [--copies 4]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_matvec import sparse_matvec, topk_values_indices


def seconds(fn, *args_per_call):
  """Wall time per call of a burst: fn on each argument tuple, back to back."""
  time.sleep(0.05)
  start = time.perf_counter()
  for args in args_per_call:
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / len(args_per_call)


def speedups(batch, ws_dn, keep, rounds):
  d = ws_dn[0].shape[0]
  k = round(keep * d)
  x_bd = jax.random.normal(jax.random.key(batch), (batch, d), jnp.float32)
  values, indices = jax.jit(topk_values_indices, static_argnums=1)(x_bd, k)
  dense = jax.jit(lambda x, w: x @ w)
  sparse = jax.jit(sparse_matvec)
  whole = jax.jit(lambda x, w: sparse_matvec(*topk_values_indices(x, k), w))
  x_masked = jnp.zeros_like(x_bd).at[jnp.arange(batch)[:, None], indices].set(values)
  np.testing.assert_allclose(sparse(values, indices, ws_dn[0]), dense(x_masked, ws_dn[0]), rtol=1e-4, atol=1e-3)
  for _ in range(2):
    jax.block_until_ready([(dense(x_bd, w), sparse(values, indices, w), whole(x_bd, w)) for w in ws_dn])
  ratios, ratios_whole, dense_ms = [], [], []
  for _ in range(rounds):
    t_dense = seconds(dense, *[(x_bd, w) for w in ws_dn])
    ratios.append(t_dense / seconds(sparse, *[(values, indices, w) for w in ws_dn]))
    ratios_whole.append(t_dense / seconds(whole, *[(x_bd, w) for w in ws_dn]))
    dense_ms.append(t_dense * 1e3)
  return float(np.median(ratios)), float(np.median(ratios_whole)), float(np.median(dense_ms))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--out", type=int, default=11008)
  parser.add_argument("--keep", type=float, default=0.4)
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--copies", type=int, default=4, help="different W read in turn (beyond the caches)")
  args = parser.parse_args()
  ws_dn = [jax.random.normal(jax.random.key(c), (args.dim, args.out), jnp.float32) for c in range(args.copies)]
  print(f"{jax.default_backend()}, float32, {args.copies} x W [{args.dim}, {args.out}], {args.keep:.0%} of each row "
        f"kept, median of {args.rounds} rounds")
  results = {}
  for batch in (16, 8, 1):
    results[batch] = speedups(batch, ws_dn, args.keep, args.rounds)
    kernel, whole, dense_ms = results[batch]
    print(f"batch {batch:>2}: dense {dense_ms:6.2f} ms; sparse {kernel:.2f}x faster, "
          f"with selection {whole:.2f}x")
  print(f"sparse_matvec_vs_dense: {results[1][0]:.2f}")


if __name__ == "__main__":
  main()
