#!/usr/bin/env bash
# The GPU check and kernel table (issue 19, item 4), in order, stopping at the first failure:
#   1. numbers: each Mosaic GPU kernel (backend "pallas") against its reference at 7B decode shapes (exits 1 above
#      tolerance: then nothing is timed);
#   2. time: dense XLA matvec vs the XLA sparse path vs the kernel, D 4096 -> N 11008 and back, 40% kept, batch 1, 8,
#      16; it prints the pallas_kernels/gpu_verified.py line to add (kernel, GPU, date, max error, speedup at batch 1);
#      then ternary_matmul (int8 x packed 2-bit) the same way against a bfloat16 dense matmul, batch 1 to 256;
#   3. the kernel table of scripts/bench_kernels.py (every op with backend "auto" against its dense baseline);
#   4. end-to-end decode, sparse vs dense, at batch 1 and 8 (scripts/bench_decode.py: the TinyLlama-1.1B-shaped model).
# About 3 minutes on an H100/H200.
#   bash scripts/bench_gpu.sh            # on the GPU machine
#   bash scripts/bench_gpu.sh --dry      # tiny shapes on the CPU: checks step 3's script only
# PYTHON names the interpreter (default python3, e.g. the one of an activated virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [[ "${1:-}" == "--dry" ]]; then
  exec "$PYTHON" scripts/bench_kernels.py "$@"
fi
if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')"; then
  echo "bench_gpu.sh: no GPU/TPU visible to JAX; use --dry for the CPU check" >&2
  exit 2
fi
if "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  "$PYTHON" - <<'EOF'
import datetime, sys, time
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels import gpu_verified
from pallas_kernels.sparse_matvec import sparse_matvec
from pallas_kernels.sparse_matvec.reference import sparse_matvec_reference

gpu = gpu_verified.gpu_name(jax.devices()[0].device_kind) or jax.devices()[0].device_kind
rng = np.random.default_rng(0)

def problem(b, d, n, keep, dtype):
  k = round(keep * d)
  w = jnp.asarray(rng.standard_normal((d, n)) / np.sqrt(d), dtype)
  indices = jnp.asarray(np.stack([np.sort(rng.choice(d, k, replace=False)) for _ in range(b)]), jnp.int32)
  return jnp.asarray(rng.standard_normal((b, k)), dtype), indices, w

sys.path.insert(0, "scripts")
from bench_kernels import median_seconds  # the kernel table's timing: warm-up, then the median of repeats

def median_ms(fn, *args, repeats=50):
  return 1e3 * median_seconds(fn, args, repeats)

kernel = jax.jit(lambda v, i, w: sparse_matvec(v, i, w, backend="pallas"))
xla_sparse = jax.jit(lambda v, i, w: sparse_matvec(v, i, w, backend="xla"))
dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
max_error = 0.0
for dtype in (jnp.bfloat16, jnp.float32):  # 1. numbers first
  for d, n in ((4096, 11008), (11008, 4096)):
    for b in (1, 8, 16):
      v, i, w = problem(b, d, n, 0.4, dtype)
      error = float(jnp.max(jnp.abs(kernel(v, i, w).astype(jnp.float32) - sparse_matvec_reference(v, i, w))))
      tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-4  # bfloat16: the output's rounding; float32: sum order
      print(f"check sparse_matvec {jnp.dtype(dtype).name} D{d} N{n} B{b}: max error {error:.2e}", flush=True)
      if not error <= tolerance:
        sys.exit(f"bench_gpu.sh: sparse_matvec on {gpu} differs from its reference by {error} (> {tolerance})")
      max_error = max(max_error, error)
speedup_b1 = None
for d, n in ((4096, 11008), (11008, 4096)):  # 2. then time, bfloat16
  for b in (1, 8, 16):
    v, i, w = problem(b, d, n, 0.4, jnp.bfloat16)
    x = jnp.zeros((b, d), jnp.bfloat16).at[jnp.arange(b)[:, None], i].set(v)
    ms = {"dense": median_ms(dense, x, w), "xla sparse": median_ms(xla_sparse, v, i, w),
          "kernel": median_ms(kernel, v, i, w)}
    speedup = ms["dense"] / ms["kernel"]
    speedup_b1 = speedup if (b, d) == (1, 4096) else speedup_b1
    print(f"time sparse_matvec D{d} N{n} B{b} 40% kept: dense {ms['dense']:.3f} ms, xla sparse "
          f"{ms['xla sparse']:.3f} ms, kernel {ms['kernel']:.3f} ms: {speedup:.2f}x", flush=True)
print(f'record: gpu_verified.Verified("sparse_matvec", "{gpu}", "{datetime.date.today()}", {max_error:.2e}, '
      f'{speedup_b1:.2f}, "bf16 4096->11008 40% kept, batch 1, scripts/bench_gpu.sh")', flush=True)

# ternary_matmul: int8 activation codes x packed 2-bit weights (method.md §4) against its reference, then against a
# bfloat16 dense matmul of the same shapes (decode at batch 1, 8, 16 and a 256-row prefill tile).
from qsparse_jax.ops import absmax_quantize, absmean_ternary
from pallas_kernels.ternary_matmul import pack_ternary, ternary_matmul
from pallas_kernels.ternary_matmul.reference import ternary_matmul_reference

def ternary_problem(b, d, n):
  codes, act_scale = absmax_quantize(jnp.asarray(rng.standard_normal((b, d)), jnp.float32), 8)
  w = jnp.asarray(rng.standard_normal((d, n)) / np.sqrt(d), jnp.float32)
  w_codes, w_scale = absmean_ternary(w)
  return codes, act_scale, pack_ternary(w_codes.astype(jnp.int8)), w_scale, w

t_kernel = jax.jit(lambda c, s, p, a: ternary_matmul(c, s, p, a, backend="pallas"))
t_xla = jax.jit(lambda c, s, p, a: ternary_matmul(c, s, p, a, backend="xla"))
t_error, t_speedup_b1 = 0.0, None
for d, n in ((4096, 11008), (11008, 4096)):
  for b in (1, 8, 16, 256):
    codes, act_scale, packed, w_scale, w = ternary_problem(b, d, n)
    want = ternary_matmul_reference(codes, act_scale, packed, w_scale)
    got = t_kernel(codes, act_scale, packed, w_scale)
    error = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))  # int32 sums exact: float32 scaling only
    print(f"check ternary_matmul D{d} N{n} B{b}: max relative error {error:.2e}", flush=True)
    if not error <= 1e-5:
      sys.exit(f"bench_gpu.sh: ternary_matmul on {gpu} differs from its reference by {error} (> 1e-5)")
    t_error = max(t_error, error)
    x, w16 = (codes.astype(jnp.float32) / act_scale).astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    ms = {"dense": median_ms(dense, x, w16), "xla": median_ms(t_xla, codes, act_scale, packed, w_scale),
          "kernel": median_ms(t_kernel, codes, act_scale, packed, w_scale)}
    speedup = ms["dense"] / ms["kernel"]
    t_speedup_b1 = speedup if (b, d) == (1, 4096) else t_speedup_b1
    print(f"time ternary_matmul D{d} N{n} B{b}: dense bf16 {ms['dense']:.3f} ms, xla {ms['xla']:.3f} ms, kernel "
          f"{ms['kernel']:.3f} ms: {speedup:.2f}x", flush=True)
print(f'record: gpu_verified.Verified("ternary_matmul", "{gpu}", "{datetime.date.today()}", {t_error:.2e}, '
      f'{t_speedup_b1:.2f}, "int8 x 2-bit 4096->11008 vs bf16 dense, batch 1, scripts/bench_gpu.sh")', flush=True)
EOF
fi
"$PYTHON" scripts/bench_kernels.py "$@"
exec "$PYTHON" scripts/bench_decode.py --models tinyllama --tokens 64 --rounds 2
