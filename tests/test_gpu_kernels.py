"""The Mosaic GPU kernels compiled for H100 and H200 without a GPU (issue 19, item 2).

One fresh process in the CUDA compile environment (.venv-cuda, made by scripts/cuda_compile_env.sh; this file is its
script) compiles every case from XLA's description of each GPU (qsparse_jax/training/gpu_specs/): for each, the
op's entry point with backend="pallas" must compile and hold the Mosaic GPU custom call, and with backend="auto" must
not (gpu_verified.RECORD is empty: "auto" keeps XLA on GPUs until a device has checked the kernel). It prints one JSON
line per case and `gpu_kernel_cases_compiled: N/N`. Skipped, saying so, without the CUDA plugin.

Cases: sparse_matvec at a 7B model's decode shapes, D 4096 -> N 11008 and back, K at 40% and 50% of D kept, batch 1, 8
and 16, W bfloat16 and float32; ternary_matmul (int8 x packed 2-bit) at the same D and N, batch 1, 8, 16 and a 256-row
prefill tile. Other kernels add their case builders to CASE_BUILDERS (marked below).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from cuda_env import cuda_python

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb"}
CUSTOM_CALL = "mosaic_gpu_v2"  # the custom call target of a Mosaic GPU kernel in the compiled HLO (jax 0.10)
SUMMARY = "gpu_kernel_cases_compiled: "


def sparse_matvec_cases():
  """(name, fn, [(shape, dtype)], expect_kernel) for sparse_matvec: y [B, N] from values, indices [B, K], W [D, N]."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from pallas_kernels.sparse_matvec import sparse_matvec  # pylint: disable=import-outside-toplevel

  def entry(backend):
    return lambda values_bk, indices_bk, w_dn: sparse_matvec(values_bk, indices_bk, w_dn, backend=backend)

  for dtype in (jnp.bfloat16, jnp.float32):
    for d, n in ((4096, 11008), (11008, 4096)):
      for keep in (0.4, 0.5):
        for b in (1, 8, 16):
          k = round(keep * d)
          shapes = [((b, k), dtype), ((b, k), jnp.int32), ((d, n), dtype)]
          name = f"sparse_matvec {jnp.dtype(dtype).name} D{d} N{n} keep{keep} B{b}"
          yield name, entry("pallas"), shapes, True
  yield "sparse_matvec auto keeps XLA (no record)", entry("auto"), [((1, 1638), jnp.bfloat16),
                                                                     ((1, 1638), jnp.int32),
                                                                     ((4096, 11008), jnp.bfloat16)], False


def ternary_matmul_cases():
  """ternary_matmul: y [T, N] float32 from int8 codes [T, D], scales [T, 1], packed uint8 [D/4, N], w_scale; 7B decode
  shapes both ways at batch 1, 8, 16 and a 256-row prefill tile."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from pallas_kernels.ternary_matmul import ternary_matmul  # pylint: disable=import-outside-toplevel

  def entry(backend):
    return lambda codes_td, scale_t1, packed_qn, w_scale: ternary_matmul(codes_td, scale_t1, packed_qn, w_scale,
                                                                         backend=backend)

  def shapes(t, d, n):
    return [((t, d), jnp.int8), ((t, 1), jnp.float32), ((d // 4, n), jnp.uint8), ((), jnp.float32)]

  for d, n in ((4096, 11008), (11008, 4096)):
    for t in (1, 8, 16, 256):
      yield f"ternary_matmul D{d} N{n} {'prefill' if t > 16 else 'B'}{t}", entry("pallas"), shapes(t, d, n), True
  yield "ternary_matmul auto keeps XLA (no record)", entry("auto"), shapes(1, 4096, 11008), False


# ---- Case builders, one per kernel. ternary_matmul: append its builder (same tuple form) to this list. ----
CASE_BUILDERS = [sparse_matvec_cases, ternary_matmul_cases]


def compile_all() -> int:
  """Compile every case for every GPU of SPECS; print a JSON line per case, then the summary. 0 if all passed."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  cases = [case for builder in CASE_BUILDERS for case in builder()]
  passed = total = 0
  for gpu, spec in SPECS.items():
    config = (ROOT / "qsparse_jax" / "training" / "gpu_specs" / spec).read_text(encoding="utf-8")
    topology = topologies.get_topology_desc(platform="cuda", target_config=config, topology="1x1x1")
    mesh = topologies.make_mesh(topology, (1,), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec())
    for name, fn, shapes, expect_kernel in cases:
      total += 1
      start = time.perf_counter()
      record = {"gpu": gpu, "case": name}
      try:
        with jax.set_mesh(mesh):
          args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in shapes]
          text = jax.jit(fn).lower(*args).compile().as_text()
        record["kernel"] = f'custom_call_target="{CUSTOM_CALL}"' in text
        record["ok"] = record["kernel"] == expect_kernel
      except Exception as error:  # pylint: disable=broad-except  (reported per case)
        record.update(ok=False, error=f"{type(error).__name__}: {str(error)[:500]}")
      record["seconds"] = round(time.perf_counter() - start, 2)
      passed += record["ok"]
      print(json.dumps(record), flush=True)
  print(f"{SUMMARY}{passed}/{total}", flush=True)
  return 0 if passed == total else 1


if __name__ == "__main__":
  sys.exit(compile_all())
else:
  import pytest

  PYTHON = cuda_python()

  @pytest.mark.skipif(PYTHON is None, reason="no jax CUDA plugin here or in .venv-cuda (make it with bash "
                      "scripts/cuda_compile_env.sh)")
  def test_every_gpu_kernel_case_compiles_for_h100_and_h200(capsys):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
    result = subprocess.run([PYTHON, __file__], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
                            check=False)
    lines = result.stdout.strip().splitlines()
    failed = [line for line in lines if line.startswith("{") and not json.loads(line)["ok"]]
    assert lines and lines[-1].startswith(SUMMARY), result.stderr[-3000:]
    with capsys.disabled():
      seconds = sum(json.loads(line)["seconds"] for line in lines if line.startswith("{"))
      print(f"\n{lines[-1]} ({seconds:.0f} s compiling)")
    assert result.returncode == 0 and not failed, "\n".join(failed[:10]) or result.stderr[-3000:]
    done, total = map(int, lines[-1].removeprefix(SUMMARY).split("/"))
    assert done == total >= 2 * 24
