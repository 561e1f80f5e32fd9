"""Sparse decode matvec against the dense one (issue: kernels; target >= 2.0 at 40% kept, batch 1, CPU).

In one process, float32, W: [D, N] = [4096, 11008] (a 7B model's up projection):
  dense   x @ W for x [B, D]
  sparse  pallas_kernels.sparse_matvec(values, indices, W) with the kept 40% of each row of x (backend "auto":
          the XLA fast path on the CPU, the Pallas kernel on TPU)
  select  topk_values_indices(x, K) + sparse: the whole sparse projection, selection included
After warm-up, rounds time dense and sparse side by side (a short pause before each, so that neither pays for the
other's worker threads); each figure is the median over rounds of dense / sparse. Batches 8 and 16 are printed for
reference (each row keeps its own 40%, so the rows of W read grow with the batch). The last line is
`sparse_matvec_vs_dense: <median speedup at batch 1>`.

    python scripts/bench_sparse_matvec.py [--dim 4096] [--out 11008] [--keep 0.4] [--rounds 15]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_matvec import sparse_matvec, topk_values_indices


def seconds(fn, *args):
  time.sleep(0.05)
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def speedups(batch, w_dn, keep, rounds):
  d = w_dn.shape[0]
  k = round(keep * d)
  x_bd = jax.random.normal(jax.random.key(batch), (batch, d), jnp.float32)
  values, indices = jax.jit(topk_values_indices, static_argnums=1)(x_bd, k)
  dense = jax.jit(lambda x, w: x @ w)
  sparse = jax.jit(sparse_matvec)
  whole = jax.jit(lambda x, w: sparse_matvec(*topk_values_indices(x, k), w))
  x_masked = jnp.zeros_like(x_bd).at[jnp.arange(batch)[:, None], indices].set(values)
  np.testing.assert_allclose(sparse(values, indices, w_dn), dense(x_masked, w_dn), rtol=1e-4, atol=1e-3)
  for _ in range(3):
    jax.block_until_ready((dense(x_bd, w_dn), sparse(values, indices, w_dn), whole(x_bd, w_dn)))
  ratios, ratios_whole, dense_ms = [], [], []
  for _ in range(rounds):
    t_dense = seconds(dense, x_bd, w_dn)
    ratios.append(t_dense / seconds(sparse, values, indices, w_dn))
    ratios_whole.append(t_dense / seconds(whole, x_bd, w_dn))
    dense_ms.append(t_dense * 1e3)
  return float(np.median(ratios)), float(np.median(ratios_whole)), float(np.median(dense_ms))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--out", type=int, default=11008)
  parser.add_argument("--keep", type=float, default=0.4)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  w_dn = jax.random.normal(jax.random.key(0), (args.dim, args.out), jnp.float32)
  print(f"{jax.default_backend()}, float32, W [{args.dim}, {args.out}], {args.keep:.0%} of each row kept, "
        f"median of {args.rounds} rounds")
  results = {}
  for batch in (16, 8, 1):
    results[batch] = speedups(batch, w_dn, args.keep, args.rounds)
    kernel, whole, dense_ms = results[batch]
    print(f"batch {batch:>2}: dense {dense_ms:6.2f} ms; sparse {kernel:.2f}x faster, "
          f"with selection {whole:.2f}x")
  print(f"sparse_matvec_vs_dense: {results[1][0]:.2f}")


if __name__ == "__main__":
  main()
