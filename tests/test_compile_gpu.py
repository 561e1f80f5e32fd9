"""`qsparse compile` for NVIDIA GPUs without a GPU: jax's CUDA plugin compiles the train step from XLA's description of
an H100 or H200 (qsparse_jax/training/gpu_specs/).

The plugin lives in its own environment (scripts/cuda_compile_env.sh makes .venv-cuda); these tests run there in a
fresh process and are skipped, saying so, where neither that environment nor this one has it. The paper's 300M preset
cut to one layer and a short batch compiles in about 20 s per target: each GPU's arguments are exactly its FSDP share
of the float32 weights and both Adam moments plus its rows of the batch, and a step too big for one H100 exits 1 with
the advice.
"""

import json
import os
import pathlib
import re
import subprocess

import pytest
from cuda_env import cuda_python

from qsparse_jax.config import apply_overrides, load_preset
from qsparse_jax.nn.model import count_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESET = "configs/paper_300m.py"
SMALL = ["model.num_layers=1", "train.batch_size=32", "data.seq_len=512", "train.microbatches=1"]


PYTHON = cuda_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason="no jax CUDA plugin here or in .venv-cuda (make it with "
                                "bash scripts/cuda_compile_env.sh)")

REPORT = """
import dataclasses, json, sys
from qsparse_jax.config import apply_overrides, load_preset
from qsparse_jax.training import compile as aot
r = aot.compile_for(apply_overrides(load_preset(sys.argv[1]), sys.argv[3:]), sys.argv[2])
print(json.dumps({k: v for k, v in dataclasses.asdict(r).items() if isinstance(v, (int, float, str, bool))}))
"""


def run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
  return subprocess.run([PYTHON, *args], capture_output=True, text=True, cwd=ROOT, timeout=900, env=env, check=False)


@pytest.mark.parametrize("gpus", ["h100x8", "h200x8"])
def test_each_gpu_holds_its_fsdp_share_of_the_train_state(gpus):
  result = run("-c", REPORT, PRESET, gpus, *SMALL)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  cfg = apply_overrides(load_preset(PRESET), SMALL)
  params = count_params(cfg.model)["total"]
  rows = cfg.train.batch_size * (cfg.data.seq_len + 1) * 4
  # float32 weights, Adam's mu and nu, split 8 ways (FSDP over every GPU; the norm scales, 1/40000 of the weights, stay
  # whole), the batch's rows split 8 ways, the step and Adam's count
  want = (3 * 4 * params + rows) / 8
  assert report["argument_bytes"] == pytest.approx(want, rel=2e-4)
  assert report["fits"] and 0 < report["temp_bytes"] < 8 << 30
  assert report["peak_bytes"] == (report["argument_bytes"] + report["temp_bytes"] + report["output_bytes"]
                                  - report["alias_bytes"])
  assert report["alias_bytes"] >= 3 * 4 * params / 8  # the new state is written over the old one


def test_a_step_too_big_for_the_gpu_exits_1_with_the_advice():
  """The full 256 x 2048 batch in one go without remat needs far more than one H100's 79 GiB (float32 logits alone
  are 67 GB); the command prints the memory it found and exits 1, and the same command fits an H200 at batch 32."""
  layer = ["model.num_layers=1", "model.remat=none", "train.microbatches=1"]
  result = run("-m", "qsparse_jax.cli", "compile", "--config", PRESET, "--topology", "h100x1", *layer)
  assert result.returncode == 1, result.stderr[-2000:]
  assert re.search(r"peak +[\d.]+ GiB of +79.14 GiB", result.stdout)
  errors = [line for line in result.stderr.splitlines() if line.startswith("qsparse compile:")]
  assert len(errors) == 1 and re.fullmatch(
      r"qsparse compile: error: configs/paper_300m.py does not fit h100x1 \([\d.]+ GiB per GPU, beyond its 79.1 "
      r"GiB\); try model.remat=full, then train.microbatches=2, then a larger slice", errors[0]), errors
  fits = run("-m", "qsparse_jax.cli", "compile", "--config", PRESET, "--topology", "h200x1", *layer,
             "train.batch_size=32", "data.seq_len=512")
  assert fits.returncode == 0, fits.stderr[-2000:]
  lines = fits.stdout.strip().splitlines()
  assert lines[0] == "slice: h200x1 = 1 H200 GPU (1 host of 1, 1x1x1), 139.9 GiB HBM and 989 TFLOP/s bf16 each"
  assert 0 < float(lines[-1].removeprefix("hbm_fraction: ")) < 0.1


def test_decode_step_compiles_for_two_hosts():
  """generate's decode step over 16 H200s on two hosts: weights split 16 ways, the 16 rows' cache one row each."""
  result = run("-m", "qsparse_jax.cli", "compile", "--decode", "--batch", "16", "--context", "1024", "--config",
               PRESET, "--topology", "h200x16", "model.num_layers=1")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[:3] == ["slice: h200x16 = 16 H200 GPUs (2 hosts of 8, 1x2x8), 139.9 GiB HBM and 989 TFLOP/s bf16 each",
                       "mesh: data 1 x fsdp 16 x tensor 1",
                       "decode step: 16 rows x 1 token, KV cache of 1024 tokens (rows split over data x fsdp)"]
  assert lines[-1].startswith("hbm_fraction: ")


def test_sparse_decode_step_moves_about_the_kept_fraction_of_the_dense_bytes():
  """One layer of the 300M preset with a 1024-token vocabulary, 40% kept at every site, batch 1, on an H200: the
  compiled sparse decode step moves 0.35-0.6 of its dense counterpart's bytes (hlo_traffic, from the programs).

  The weights alone predict (0.4 P + H) / (P + H) = 0.45, with P = 4 x 1024² + 3 x 1024 x 2730 = 12.6M projection
  and H = 1.05M LM head parameters, both read as float32 (the embedding reads one row). Below that: the dense program
  writes a bfloat16 copy of some projections and reads it again (up to 8 bytes per parameter, not 4). Above it: the
  sparse one reads its kept rows in steps of 16 (DEVICE_ROWS_PER_STEP, padded), and selects them (top-K, a few
  row-sized passes per site). Both read the 512-token cache (0.1% of the bytes). Measured: 0.44; the CPU's loop plan
  (8 groups of partial sums carried through the loop) gave 0.84 here."""
  layer = ["model.num_layers=1", "model.vocab_size=1024", "model.sparsity_qkv=0.6", "model.sparsity_out=0.6",
           "model.sparsity_up=0.6", "model.sparsity_down=0.6"]
  result = run("-m", "qsparse_jax.cli", "compile", "--decode", "--context", "512", "--config", PRESET, "--topology",
               "h200x1", *layer)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1].startswith("hbm_fraction: ")
  ratio = float(lines[-2].removeprefix("decode_bytes_sparse_vs_dense: "))
  sparse, dense, weights = map(float, re.search(
      r"bytes per step per GPU: sparse ([\d.]+) GiB, dense ([\d.]+) GiB \(weights ([\d.]+) GiB", result.stdout).groups())
  assert 0.35 <= ratio <= 0.6 and ratio == pytest.approx(sparse / dense, abs=2e-3)  # both printed to 4 digits
  assert weights == pytest.approx(4 * count_params(apply_overrides(load_preset(PRESET), layer).model)["total"] / 2**30,
                                  abs=1e-3)
  assert dense >= 0.9 * weights  # the dense step reads every weight but the embedding table's (7% of them)
