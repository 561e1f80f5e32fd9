"""Every sparse-core op against its XLA dense baseline at 7B shapes, as a table (run by scripts/bench_gpu.sh).

Rows: top-K selection (4096 tokens x 4096) against lax.top_k; sparse_matvec (40% kept) at batch 1, 8 and 16
against the dense [B, 4096] x [4096, 11008] matvec; nm_matmul 16:32 for 4096 tokens against the dense matmul;
ternary_matmul (int8 x 2-bit weights) for 4096 tokens against the dense matmul in the compute dtype. Each time is
the median of --repeats runs after warm-up; "GB/s" is the bytes the op must move (inputs read once, output written
once; for sparse_matvec only the kept rows of W) over its time, and "of copy" that bandwidth as a fraction of a
device-to-device copy of 1 GiB measured in the same process. The ops run with backend "auto": the backend column
says which implementation that picked on this platform.

    python scripts/bench_kernels.py [--repeats 20] [--dtype bfloat16]
    python scripts/bench_kernels.py --dry      # tiny shapes, 2 repeats: checks the script on any machine
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import qsparse_jax
from pallas_kernels import dispatch
from pallas_kernels.nm_matmul import nm_matmul
from pallas_kernels.nm_matmul.ops import PALLAS_PLATFORMS as NM_PLATFORMS
from pallas_kernels.sparse_matvec import sparse_matvec, topk_values_indices
from pallas_kernels.sparse_matvec.ops import PALLAS_PLATFORMS as SMV_PLATFORMS
from pallas_kernels.ternary_matmul import pack_ternary, ternary_matmul
from pallas_kernels.ternary_matmul.ops import PALLAS_PLATFORMS as TERNARY_PLATFORMS
from pallas_kernels.topk import topk_sparsify
from pallas_kernels.topk.ops import PALLAS_PLATFORMS as TOPK_PLATFORMS


def median_seconds(fn, args, repeats):
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--dry", action="store_true", help="tiny shapes and 2 repeats, to check the script")
  args = parser.parse_args()
  d, f, tokens, copy_bytes = (4096, 11008, 4096, 1 << 30) if not args.dry else (256, 384, 64, 1 << 20)
  repeats = 2 if args.dry else args.repeats
  dtype = jnp.dtype(args.dtype)
  keys = iter(jax.random.split(jax.random.key(0), 16))

  src = jnp.zeros(copy_bytes // 4, jnp.float32)
  copy_gbs = 2 * copy_bytes / median_seconds(jax.jit(lambda a: a + 1), (src,), repeats) / 1e9
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {dtype.name}, device copy {copy_gbs:.0f} GB/s")
  print(f"{'op':<28} {'backend':<8} {'ms':>9} {'dense ms':>9} {'speedup':>8} {'GB/s':>8} {'of copy':>8}")

  def row(name, platforms, fn, fn_args, baseline, base_args, nbytes):
    t, t_base = median_seconds(jax.jit(fn), fn_args, repeats), median_seconds(jax.jit(baseline), base_args, repeats)
    backend = dispatch.resolve("auto", pallas_platforms=platforms)[0]
    gbs = nbytes / t / 1e9
    print(f"{name:<28} {backend:<8} {t * 1e3:9.3f} {t_base * 1e3:9.3f} {t_base / t:7.2f}x {gbs:8.1f} "
          f"{gbs / copy_gbs:7.0%}")

  x_td = jax.random.normal(next(keys), (tokens, d), dtype)
  w_df = jax.random.normal(next(keys), (d, f), dtype)
  k = round(0.4 * d)
  row(f"topk {tokens}x{d} keep 40%", TOPK_PLATFORMS, lambda x: topk_sparsify(x, k), (x_td,),
      lambda x: jax.lax.top_k(jnp.abs(x), k)[0], (x_td,), 2 * x_td.nbytes)
  for batch in (1, 8, 16):
    x_bd = x_td[:batch]
    values, indices = jax.jit(topk_values_indices, static_argnums=1)(x_bd, k)
    kept_bytes = batch * k * f * dtype.itemsize + values.nbytes + indices.nbytes + batch * f * dtype.itemsize
    row(f"sparse_matvec b{batch} keep 40%", SMV_PLATFORMS, sparse_matvec, (values, indices, w_df),
        lambda x, w: x @ w, (x_bd, w_df), kept_bytes)
  dense_mm = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)  # noqa: E731
  mm_bytes = x_td.nbytes + w_df.nbytes + tokens * f * 4
  row(f"nm_matmul 16:32 {tokens} tok", NM_PLATFORMS, lambda x, w: nm_matmul(x, w, 16, 32), (x_td, w_df),
      dense_mm, (x_td, w_df), mm_bytes)
  codes, act_scale = qsparse_jax.absmax_quantize(x_td, 8)
  w_codes, w_scale = qsparse_jax.absmean_ternary(w_df)
  packed = pack_ternary(w_codes)
  row(f"ternary_matmul {tokens} tok", TERNARY_PLATFORMS, ternary_matmul, (codes, act_scale, packed, w_scale),
      dense_mm, (x_td, w_df), codes.nbytes + packed.nbytes + tokens * f * 4)


if __name__ == "__main__":
  main()
