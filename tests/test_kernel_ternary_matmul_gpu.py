"""pallas_kernels/ternary_matmul/kernel_gpu.py: the Mosaic GPU int8 × packed-ternary kernel.

Numerics: the kernel's body in Pallas's HLO interpreter on CPU, bit-equal to reference.py (exact int32 sums, the same
float32 scaling), decode batches and padded prefill rows. Compilation: deviceless for H100 and H200 in jax's CUDA
plugin environment (.venv-cuda, as tests/test_compile_gpu.py finds it; skipped, saying so, without it): 7B decode
shapes both ways and a prefill tile hold the mosaic_gpu custom call, and blocks over the shared memory are refused.
"""

import json
import os
import pathlib
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from cuda_env import cuda_python

from pallas_kernels.ternary_matmul import pack_ternary
from pallas_kernels.ternary_matmul.kernel_gpu import GpuBlockSizes, matmul
from pallas_kernels.ternary_matmul.reference import ternary_matmul_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def operands(t, d, n, seed=0, extreme=False):
  """codes int8 [t, d], scale [t, 1], packed uint8 [d/4, n], w_scale; extreme: codes ±127 and weights all ±1 of one
  sign per column, so every sum reaches 127·d in magnitude."""
  rng = np.random.default_rng(seed)
  if extreme:
    codes = np.full((t, d), 127, np.int8) * rng.choice([-1, 1], (t, 1)).astype(np.int8)
    w = np.broadcast_to(rng.choice([-1, 1], (1, n)), (d, n)).astype(np.int8)
  else:
    codes, w = rng.integers(-127, 128, (t, d)).astype(np.int8), rng.integers(-1, 2, (d, n)).astype(np.int8)
  scale = rng.uniform(0.01, 3.0, (t, 1)).astype(np.float32)
  return jnp.asarray(codes), jnp.asarray(scale), pack_ternary(jnp.asarray(w)), jnp.float32(0.0371)


@pytest.mark.parametrize("t,d,n,blocks,extreme", [
    (1, 256, 128, None, False),  # batch-1 decode: block_t 1, no padded rows, split_q 2 (int32 partials)
    (2, 1024, 256, GpuBlockSizes(2, 128, 32, split_q=4, max_concurrent_steps=3), False),  # 2 steps per split
    (5, 128, 256, GpuBlockSizes(4, 128, 16), False),  # 2 row blocks (3 padded rows), 2 column and 2 Q blocks
    (19, 64, 128, None, False),  # a prefill tile beyond 16 rows: blocks of 16, padded
    (3, 512, 256, GpuBlockSizes(3, 256, 32), True),  # a 256-column block; sums at 127 · 512
])
def test_interpreted_body_is_bit_equal_to_the_reference(t, d, n, blocks, extreme):
  codes, scale, packed, w_scale = operands(t, d, n, extreme=extreme)
  y = matmul(codes, scale, packed, w_scale, block_sizes=blocks, interpret=True)
  want = ternary_matmul_reference(codes, scale, packed, w_scale)
  assert y.shape == (t, n) and y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_block_sizes_are_checked():
  with pytest.raises(ValueError, match="block_n"):
    GpuBlockSizes(8, 192, 64)
  with pytest.raises(ValueError, match="block_q"):
    GpuBlockSizes(8, 128, 512)  # over the TMA box
  with pytest.raises(ValueError, match="multiple of 128"):
    GpuBlockSizes(1, 128, 16).validate(1, 16, 128)  # 64 bytes of planes per copy
  with pytest.raises(ValueError, match="must divide"):
    GpuBlockSizes(8, 128, 64).validate(8, 96, 128)
  with pytest.raises(ValueError, match="split_q"):
    GpuBlockSizes(8, 128, 64, split_q=3).validate(8, 128, 128)
  # 7B decode: 11008 -> 4096 (Q = 2752 = 64 · 43) is split 4 ways at 16 rows, so 32 column blocks fill 128 SMs
  assert GpuBlockSizes.get_default(16, 2752, 4096) == GpuBlockSizes(16, 128, 16, split_q=4, max_concurrent_steps=8)
  assert GpuBlockSizes.get_default(256, 1024, 11008) == GpuBlockSizes(16, 128, 256)  # a prefill tile: 1376 programs


COMPILE = """
import json, sys, importlib.resources
import jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from pallas_kernels.ternary_matmul.kernel_gpu import GpuBlockSizes, ternary_matmul_mosaic_gpu
out = {}
for spec in ("h100_sxm", "h200_sxm"):
  text = (importlib.resources.files("qsparse_jax.training") / "gpu_specs" / f"{spec}.txtpb").read_text()
  desc = topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1")
  dev = SingleDeviceSharding(desc.devices[0])
  for t, d, n, blocks in json.loads(sys.argv[1]):
    q = d // 4
    bs = GpuBlockSizes(*blocks) if blocks else GpuBlockSizes.get_default(t, q, n)
    tp = -(-t // bs.block_t) * bs.block_t
    args = [jax.ShapeDtypeStruct(s, dt, sharding=dev) for s, dt in
            (((4, tp, q), jnp.int8), ((tp, 1), jnp.float32), ((q, n), jnp.uint8), ((), jnp.float32))]
    try:
      hlo = jax.jit(lambda *a: ternary_matmul_mosaic_gpu(*a, block_sizes=bs)).lower(*args).compile().as_text()
      out[f"{spec} {t}x{d}->{n}"] = "mosaic_gpu" if 'custom_call_target="mosaic_gpu' in hlo else "no custom call"
    except Exception as e:  # reported, the test decides
      out[f"{spec} {t}x{d}->{n}"] = f"error: {type(e).__name__}: {str(e)[:300]}"
print(json.dumps(out))
"""


def compile_cases(cases):
  python = cuda_python()
  if python is None:
    pytest.skip("no jax CUDA plugin here or in .venv-cuda (make it with bash scripts/cuda_compile_env.sh)")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
  result = subprocess.run([python, "-c", COMPILE, json.dumps(cases)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_compiles_for_h100_and_h200_and_oversized_blocks_are_refused():
  """7B decode shapes both ways at batch 1, 8, 16 and a prefill tile compile with the mosaic_gpu custom call (the ops
  entry's cases are in tests/test_gpu_kernels.py); 64 rows x 256 columns x 256 packed rows 4 steps deep, about
  700 KB of shared memory, is refused by Mosaic GPU at compile time (its checks run without a GPU)."""
  cases = [[t, d, n, None] for d, n in ((4096, 11008), (11008, 4096)) for t in (1, 8, 16)] + [[256, 4096, 11008, None]]
  cases.append([1, 256, 128, None])  # one Q step per program, a pipeline 2 deep
  report = compile_cases(cases + [[64, 4096, 256, [64, 256, 256, 1, 4]]])
  assert len(report) == 2 * (len(cases) + 1)
  oversized = {k: v for k, v in report.items() if k.endswith("64x4096->256")}
  assert len(oversized) == 2 and all("shared memory" in v for v in oversized.values()), oversized
  assert all(v == "mosaic_gpu" for k, v in report.items() if k not in oversized), report
