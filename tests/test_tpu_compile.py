"""Every Pallas kernel compiles with Mosaic for TPU v5p and v6e, ahead of time, on this CPU-only machine.

libtpu (the test extra installs jax's `tpu` extra) describes TPU slices without a TPU (jax.experimental.topologies);
a function jitted over arguments placed on one device of such a slice is lowered and compiled for that chip, and
the compiled HLO holds one `tpu_custom_call` per Mosaic kernel. The cases are the issue's: training shapes
(T = 2048, D and N among 4096 and 11008), decode shapes (B = 1 and 8, K = 40% of D), float32 and bfloat16 (int8 and
uint8 for the ternary matmul), n:m 2:4, 8:16 and 16:32, forward and backward, with backend "auto" (so each case
also checks that "auto" picks the kernel there); then cases "auto" must leave to XLA, and the same programs
compiled for the CPU, which must hold no kernel at all.

The cases run in one subprocess: libtpu allows one process per machine unless ALLOW_MULTIPLE_LIBTPU_LOAD is set
before it loads, and pytest's other worker has loaded it already. The summary line is
`tpu_kernel_cases_compiled: N/N`.

    python tests/test_tpu_compile.py        # the cases alone, one line each
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

CHIPS = {"v5p": ("v5p:2x2x1", (2, 2, 1)), "v6e": ("v6e:2x2", (2, 2, 1))}
CUSTOM_CALL = 'custom_call_target="tpu_custom_call"'


def cases():
  """(name, chip or None for the CPU, fn, [(shape, dtype)], kernels expected in the compiled program).

  chip "generic" compiles for v5p without jax.set_mesh: the kernels cannot see the chip and take the block sizes
  meant for every generation; "v5p x4" over all four chips of the slice ("v5p x4 jit": without jax.set_mesh)."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels.nm_matmul import nm_matmul
  from pallas_kernels.sparse_matvec import sparse_matvec
  from pallas_kernels.ternary_matmul import ternary_matmul
  from pallas_kernels.topk import topk_sparsify, topk_sparsify_int8

  f32, bf16, i32 = jnp.float32, jnp.bfloat16, jnp.int32
  dtypes = {"f32": f32, "bf16": bf16}
  shapes = ((4096, 11008), (11008, 4096))  # (D, N): up/gate, then down
  out = []

  def train(op):  # the loss gradient with respect to every argument: forward and backward kernels
    return jax.grad(lambda *a: jnp.sum(op(*a).astype(jnp.float32) ** 2), argnums=0)

  def train_both(op):
    return jax.grad(lambda *a: jnp.sum(op(*a).astype(jnp.float32) ** 2), argnums=(0, 1))

  for chip in (*CHIPS, "generic"):
    for dname, dt in dtypes.items():
      for d, n_out in shapes:
        k = round(0.4 * d)
        x = [((2048, d), dt)]
        if chip != "generic":
          for gradient in ("ste", "masked"):
            out.append((f"{chip} topk train {gradient} {dname} T=2048 D={d}", chip,
                        train(lambda v, g=gradient, k=k: topk_sparsify(v, k, gradient=g)), x, 1))
          out.append((f"{chip} topk_int8 {dname} T=2048 D={d}", chip, lambda v, k=k: topk_sparsify_int8(v, k), x, 1))
          for b in (1, 8):
            out.append((f"{chip} topk decode {dname} B={b} D={d}", chip, lambda v, k=k: topk_sparsify(v, k),
                        [((b, d), dt)], 1))
        elif d == 4096:
          out.append((f"{chip} topk train masked {dname} T=2048 D={d}", chip,
                      train(lambda v, k=k: topk_sparsify(v, k, gradient="masked")), x, 1))
          out.append((f"{chip} topk_int8 {dname} T=2048 D={d}", chip, lambda v, k=k: topk_sparsify_int8(v, k), x, 1))
        xw = [((2048, d), dt), ((d, n_out), dt)]
        for n, m in ((2, 4), (8, 16), (16, 32)):
          if chip == "generic" and (d, n, m) != (4096, 16, 32):
            continue
          out.append((f"{chip} nm_matmul {n}:{m} forward {dname} T=2048 D={d} N={n_out}", chip,
                      lambda a, w, n=n, m=m: nm_matmul(a, w, n, m), xw, 1))
          # The backward pass: the forward kernel and the select kernel, which masks x and, under "masked", dx too.
          # N does not shape the select kernel; 256 spares XLA compiling two [2048, D] x [D, 11008] dots per case.
          for gradient in ("masked", "ste") if (n, m) == (16, 32) else ("masked",):
            out.append((f"{chip} nm_matmul {n}:{m} train {gradient} {dname} T=2048 D={d} N=256", chip,
                        train_both(lambda a, w, n=n, m=m, g=gradient: nm_matmul(a, w, n, m, gradient=g)),
                        [((2048, d), dt), ((d, 256), dt)], 2))
          if chip != "generic":
            for b in (1, 8):
              out.append((f"{chip} nm_matmul {n}:{m} decode {dname} B={b} D={d} N={n_out}", chip,
                          lambda a, w, n=n, m=m: nm_matmul(a, w, n, m), [((b, d), dt), ((d, n_out), dt)], 1))
        for b in (1, 8) if chip != "generic" else (8,):
          out.append((f"{chip} sparse_matvec {dname} B={b} K={k} D={d} N={n_out}", chip, sparse_matvec,
                      [((b, k), dt), ((b, k), i32), ((d, n_out), dt)], 1))
    for t in (1, 8, 2048) if chip != "generic" else (2048,):
      for d, n_out in shapes:
        out.append((f"{chip} ternary_matmul int8 x uint8 T={t} D={d} N={n_out}", chip, ternary_matmul,
                    [((t, d), jnp.int8), ((t, 1), f32), ((d // 4, n_out), jnp.uint8), ((), f32)], 1))

  # kernel_supported accepts widths by the tiling rule, not only 4096 and 11008: its other corners, on v5p.
  out += [
      ("v5p widths topk int8 f32 T=2048 D=16384 (MAX_KERNEL_WIDTH)", "v5p", lambda v: topk_sparsify_int8(v, 6554),
       [((2048, 16384), f32)], 1),
      ("v5p widths topk masked bf16 T=2048 D=1536", "v5p", train(lambda v: topk_sparsify(v, 614, gradient="masked")),
       [((2048, 1536), bf16)], 1),
      ("v5p widths nm_matmul 16:32 f32 T=2048 D=16384 N=384 (MAX_KERNEL_DEPTH)", "v5p",
       lambda a, w: nm_matmul(a, w, 16, 32), [((2048, 16384), f32), ((16384, 384), f32)], 1),
      ("v5p widths nm_matmul 1:8 bf16 T=2048 D=1536 N=5632", "v5p", lambda a, w: nm_matmul(a, w, 1, 8),
       [((2048, 1536), bf16), ((1536, 5632), bf16)], 1),
      ("v5p widths sparse_matvec bf16 B=16 K=2253 D=5632 N=1536", "v5p", sparse_matvec,
       [((16, 2253), bf16), ((16, 2253), i32), ((5632, 1536), bf16)], 1),
      ("v5p widths ternary_matmul T=300 D=5632 N=1536", "v5p", ternary_matmul,
       [((300, 5632), jnp.int8), ((300, 1), f32), ((1408, 1536), jnp.uint8), ((), f32)], 1),
  ]
  # "auto" leaves these to XLA (no kernel), "xla" always; "pallas" compiles the kernel, never interpret mode.
  topk_k = lambda v: topk_sparsify(v, 100)  # noqa: E731
  out += [
      ("v5p auto->xla topk D=4000 (not a multiple of 128)", "v5p", topk_k, [((64, 4000), f32)], 0),
      ("v5p auto->xla topk float16", "v5p", topk_k, [((64, 4096), jnp.float16)], 0),
      ("v5p auto->xla nm_matmul 1:3 (3 does not divide 128)", "v5p", lambda a, w: nm_matmul(a, w, 1, 3),
       [((64, 384), f32), ((384, 256), f32)], 0),
      ("v5p auto->xla nm_matmul N=100", "v5p", lambda a, w: nm_matmul(a, w, 2, 4),
       [((64, 256), f32), ((256, 100), f32)], 0),
      ("v5p auto->xla sparse_matvec float16", "v5p", sparse_matvec,
       [((1, 64), jnp.float16), ((1, 64), i32), ((256, 256), jnp.float16)], 0),
      ("v5p auto->xla ternary_matmul D=80 (Q=20)", "v5p", ternary_matmul,
       [((8, 80), jnp.int8), ((8, 1), f32), ((20, 256), jnp.uint8), ((), f32)], 0),
      ("v5p backend=xla topk", "v5p", lambda v: topk_sparsify(v, 100, backend="xla"), [((64, 4096), f32)], 0),
      ("v5p backend=pallas topk D=4000", "v5p", lambda v: topk_sparsify(v, 100, backend="pallas"),
       [((64, 4000), f32)], 1),
      # Over all 4 chips: XLA would have to partition a Mosaic kernel, which it cannot; per shard it runs.
      ("v5p x4 auto->xla topk in a program partitioned over 4 chips", "v5p x4", topk_k, [((64, 4096), f32)], 0),
      ("v5p x4 jit auto->xla topk over arguments on 4 chips, no jax.set_mesh", "v5p x4 jit", topk_k,
       [((64, 4096), f32)], 0),
      ("v5p x4 topk per shard in shard_map over 4 chips", "v5p x4",
       jax.shard_map(topk_k, in_specs=jax.P("x"), out_specs=jax.P("x"), check_vma=False), [((64, 4096), f32)], 1),
  ]
  # The same programs compiled for the CPU: the XLA path, and interpret mode (no Mosaic) for backend="pallas".
  out += [
      ("cpu auto topk train masked f32", None, train(lambda v: topk_sparsify(v, 1638, gradient="masked")),
       [((64, 4096), f32)], 0),
      ("cpu pallas topk f32", None, lambda v: topk_sparsify(v, 1638, backend="pallas"), [((64, 4096), f32)], 0),
      ("cpu auto nm_matmul 16:32 train masked bf16", None,
       train_both(lambda a, w: nm_matmul(a, w, 16, 32, gradient="masked")), [((64, 4096), bf16), ((4096, 256), bf16)],
       0),
  ]
  return out


def compile_case(fn, args, chip):
  """The compiled HLO text of jax.jit(fn) for one device of the chip's topology (under jax.set_mesh unless chip
  is "generic"), or for the CPU when chip is None."""
  import jax
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  if chip is None:
    return jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, d) for s, d in args)).compile().as_text()
  name, bounds = CHIPS["v5p" if chip in ("generic", "v5p x4", "v5p x4 jit") else chip]
  topology = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                          chips_per_host_bounds=bounds, num_slices=1)
  mesh = Mesh(topology.devices if chip.startswith("v5p x4") else topology.devices[:1], ("x",))
  specs = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, PartitionSpec())) for s, d in args]
  if chip in ("generic", "v5p x4 jit"):
    return jax.jit(fn).lower(*specs).compile().as_text()
  with jax.set_mesh(mesh):
    return jax.jit(fn).lower(*specs).compile().as_text()


def run_cases() -> None:
  """Compile every case; print one JSON line per case: name, expected and found kernels, seconds, error."""
  for name, chip, fn, args, expected in cases():
    start = time.perf_counter()
    try:
      found, error = compile_case(fn, args, chip).count(CUSTOM_CALL), None
    except Exception as e:  # noqa: BLE001 -- a failed compile is a result to report, not a crash
      found, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    print(json.dumps(dict(name=name, expected=expected, found=found, seconds=round(time.perf_counter() - start, 2),
                          error=error)), flush=True)


@pytest.fixture(scope="module")
def results():
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (the test extra installs it with jax[tpu] on x86-64 Linux)")
  env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1"}
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                        timeout=1200)
  lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert proc.returncode == 0 and lines, f"the compile subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return lines


def test_every_kernel_compiles_with_mosaic_for_v5p_and_v6e(results):
  kernel_cases = [r for r in results if r["expected"] > 0]
  compiled = [r for r in kernel_cases if r["found"] == r["expected"]]
  print(f"tpu_kernel_cases_compiled: {len(compiled)}/{len(kernel_cases)}")
  assert len(kernel_cases) >= 150
  failed = [f"{r['name']}: expected {r['expected']} kernel(s), found {r['found']} {r['error'] or ''}"
            for r in kernel_cases if r["found"] != r["expected"]]
  assert not failed, "\n".join(failed)
  assert {r["name"].split()[0] for r in compiled} == {"v5p", "v6e", "generic"}


def test_auto_leaves_the_rest_to_xla_and_the_cpu_never_sees_mosaic(results):
  others = [r for r in results if r["expected"] == 0]
  assert len(others) >= 10
  wrong = [f"{r['name']}: found {r['found']} kernel(s) {r['error'] or ''}" for r in others if r["found"] != 0]
  assert not wrong, "\n".join(wrong)


if __name__ == "__main__":
  run_cases()
