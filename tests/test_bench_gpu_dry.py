"""scripts/bench_gpu.sh in its CPU dry mode prints the whole kernel table; without a GPU the real mode refuses."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def run(*args):
  return subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh"), *args], capture_output=True, text=True,
                        env={**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}, timeout=300)


def test_dry_mode_prints_every_kernel_row():
  result = run("--dry")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert re.match(r"cpu \(cpu\), bfloat16, device copy [0-9.]+ GB/s", lines[0])
  rows = {line.split()[0] + " " + line.split()[1]: line.split() for line in lines[2:]}
  assert list(rows) == ["topk 64x256", "sparse_matvec b1", "sparse_matvec b8", "sparse_matvec b16",
                        "nm_matmul 16:32", "ternary_matmul 64"]
  for words in rows.values():
    ms, dense_ms, speedup = float(words[-5]), float(words[-4]), float(words[-3].rstrip("x"))
    assert words[-6] == "xla" and ms > 0 and dense_ms > 0
    assert abs(speedup - dense_ms / ms) <= 0.01 * speedup + 0.01


def test_real_mode_needs_an_accelerator():
  result = run()
  assert result.returncode == 2
  assert result.stderr.strip() == "bench_gpu.sh: no GPU/TPU visible to JAX; use --dry for the CPU check"
