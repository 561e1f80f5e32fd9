"""Top-K selection cost relative to the matmul it feeds (issue: exact and fast selection).

Times, in one process on the default backend, float32:
  selection  `qsparse_jax.topk_mask(x, k)` for x: [T, D], k = round(0.7 D)  (the paper's "top-K 70%")
  reference  `jax.lax.top_k(|x|, k)`
  matmul     x @ W for W: [D, D]
Each is the median of several runs after warm-up. The last line is `topk_vs_matmul: <selection / matmul>`.

    python scripts/bench_topk.py [--tokens 4096] [--dim 4096] [--repeats 7]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import qsparse_jax


def median_seconds(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--sparsity", type=float, default=0.3)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  k = round((1 - args.sparsity) * args.dim)
  x_td = jax.random.normal(jax.random.key(0), (args.tokens, args.dim), jnp.float32)
  w_dd = jax.random.normal(jax.random.key(1), (args.dim, args.dim), jnp.float32)

  select = jax.jit(lambda x: qsparse_jax.topk_mask(x, k))
  reference = jax.jit(lambda x: jax.lax.top_k(jnp.abs(x), k)[1])
  matmul = jax.jit(lambda x, w: x @ w)

  mask = np.asarray(select(x_td))
  ref_idx = np.asarray(reference(x_td))
  ref_mask = np.zeros_like(mask)
  np.put_along_axis(ref_mask, ref_idx, True, axis=-1)
  assert np.array_equal(mask, ref_mask), "fast selection disagrees with lax.top_k"

  t_matmul = median_seconds(matmul, x_td, w_dd, repeats=args.repeats)
  t_select = median_seconds(select, x_td, repeats=args.repeats)
  t_ref = median_seconds(reference, x_td, repeats=max(3, args.repeats // 2))
  t_matmul = min(t_matmul, median_seconds(matmul, x_td, w_dd, repeats=args.repeats))

  print(f"backend={jax.default_backend()} T={args.tokens} D={args.dim} k={k} float32")
  print(f"matmul [T,D]x[D,D]: {t_matmul * 1e3:9.1f} ms")
  print(f"lax.top_k(|x|):     {t_ref * 1e3:9.1f} ms  ({t_ref / t_matmul:.2f}x matmul)")
  print(f"topk_mask (exact):  {t_select * 1e3:9.1f} ms  ({t_ref / t_select:.1f}x faster than lax.top_k)")
  print(f"topk_vs_matmul: {t_select / t_matmul:.3f}")


if __name__ == "__main__":
  main()
