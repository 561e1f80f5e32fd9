"""Top-K selection cost relative to the matmul it feeds (issue: exact and fast selection).

Times, in one process on the default backend, float32:
  selection  `qsparse_jax.topk_mask(x, k)` for x: [T, D], k = round(0.7 D)  (the paper's "top-K 70%")
  reference  `jax.lax.top_k(|x|, k)`
  matmul     x @ W for W: [D, D]
After three warm-up runs of each, rounds time one matmul and one selection back to back, as a layer runs them (the
order alternating between rounds); the figure is the median over rounds of selection / matmul, which keeps the
drift of a shared machine out of the ratio. No pause between the calls: on the shared 2-core machines this was
measured on, a pause of 0.2 s before a call added 30-50 ms to the selection (its input and buffers are no longer in
cache, and it reads them block by block on one core), which is what waking an idle process costs, not what
selecting costs inside a model. The last line is `topk_vs_matmul: <median ratio>`.

    python scripts/bench_topk.py [--tokens 4096] [--dim 4096] [--repeats 7]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import qsparse_jax


def seconds(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def median_seconds(fn, *args, repeats):
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  return float(np.median([seconds(fn, *args) for _ in range(repeats)]))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--dim", type=int, default=4096)
  parser.add_argument("--sparsity", type=float, default=0.3)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()

  k = round((1 - args.sparsity) * args.dim)
  x_td = jax.random.normal(jax.random.key(0), (args.tokens, args.dim), jnp.float32)
  w_dd = jax.random.normal(jax.random.key(1), (args.dim, args.dim), jnp.float32)

  select = jax.jit(lambda x: qsparse_jax.topk_mask(x, k))
  reference = jax.jit(lambda x: jax.lax.top_k(jnp.abs(x), k)[1])
  matmul = jax.jit(lambda x, w: x @ w)

  for fn, fn_args in ((select, (x_td,)), (matmul, (x_td, w_dd))):
    for _ in range(3):
      jax.block_until_ready(fn(*fn_args))
  rounds = []
  for i in range(args.repeats):
    if i % 2:
      t_s = seconds(select, x_td)
      t_m = seconds(matmul, x_td, w_dd)
    else:
      t_m = seconds(matmul, x_td, w_dd)
      t_s = seconds(select, x_td)
    rounds.append((t_m, t_s))
  t_matmul, t_select = (float(np.median(col)) for col in zip(*rounds))
  ratio = float(np.median([t_s / t_m for t_m, t_s in rounds]))
  t_ref = median_seconds(reference, x_td, repeats=3)

  mask = np.asarray(select(x_td))
  ref_mask = np.zeros_like(mask)
  np.put_along_axis(ref_mask, np.asarray(reference(x_td)), True, axis=-1)
  assert np.array_equal(mask, ref_mask), "fast selection disagrees with lax.top_k"

  print(f"backend={jax.default_backend()} T={args.tokens} D={args.dim} k={k} float32")
  print(f"matmul [T,D]x[D,D]: {t_matmul * 1e3:9.1f} ms")
  print(f"lax.top_k(|x|):     {t_ref * 1e3:9.1f} ms  ({t_ref / t_matmul:.2f}x matmul)")
  print(f"topk_mask (exact):  {t_select * 1e3:9.1f} ms  ({t_ref / t_select:.1f}x faster than lax.top_k)")
  print(f"topk_vs_matmul: {ratio:.3f}")


if __name__ == "__main__":
  main()
