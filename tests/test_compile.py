"""`qsparse compile`: the train step compiled ahead of time for a TPU slice with libtpu, on this CPU-only machine.

The accelerator-type table is checked against Cloud TPU's slice shapes (and the GPU names against hosts of 8); the
command itself runs as a user runs it (a fresh process) on the paper's 300M preset cut to one layer and a shorter
batch, so it compiles in about a minute: it fits a v5p-8 with the memory and FLOPs XLA reports, the full batch without
remat does not fit a v5e-4, and generate's decode step fits with the weights and KV cache the test computes. GPU
targets compile in their own environment (tests/test_compile_gpu.py); here, without it, they fail in one line.
"""

import importlib.resources
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from qsparse_jax.config import apply_overrides, load_preset
from qsparse_jax.nn.model import count_params
from qsparse_jax.training.compile import GPUS, model_flops, parse_slice

PRESET = "configs/paper_300m.py"
SMALL = ["model.num_layers=1", "train.batch_size=32", "data.seq_len=512"]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (the test extra installs it on x86-64 Linux)")


@pytest.mark.parametrize("name, chips, topology", [
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-16", 8, "v5p:2x2x2"), ("v5p-128", 64, "v5p:4x4x4"),
    ("v5p-1024", 512, "v5p:8x8x8"), ("v4-32", 16, "v4:2x2x4"), ("v6e-64", 64, "v6e:8x8"), ("v6e-8", 8, "v6e:2x4"),
    ("v5litepod-16", 16, "v5e:4x4"), ("v5e-256", 256, "v5e:16x16")])
def test_accelerator_types_map_to_their_topologies(name, chips, topology):
  tpu = parse_slice(name)
  assert (tpu.chips, tpu.topology) == (chips, topology)


@pytest.mark.parametrize("name, chips, topology", [
    ("h100x8", 8, "1x1x8"), ("h200x8", 8, "1x1x8"), ("h200x16", 16, "1x2x8"), ("H100x32", 32, "1x4x8"),
    ("h200x1", 1, "1x1x1"), ("h200x4", 4, "1x1x4")])
def test_gpu_sets_map_to_hosts_of_eight(name, chips, topology):
  gpus = parse_slice(name)
  assert (gpus.chips, gpus.topology, gpus.chip.platform, gpus.unit) == (chips, topology, "cuda", "GPU")


def test_gpu_memory_is_the_shipped_descriptions():
  """Each GPU's HBM is its XLA description's device_memory_size (package data), which names the GPU it describes."""
  for name, chip in GPUS.items():
    text = (importlib.resources.files("qsparse_jax.training") / "gpu_specs" / chip.spec).read_text()
    assert int(re.search(r"device_memory_size: (\d+)", text).group(1)) == chip.hbm_bytes
    assert re.search(rf'device_description_str: "NVIDIA {name.upper()}', text)


@pytest.mark.parametrize("name, match", [("v7x-8", "is not a Cloud TPU accelerator type"),
                                         ("v5p-12", "power-of-two number of chips"), ("a100x8", "no GPU description"),
                                         ("h200x12", "hosts of 8"), ("h200", "GPUxN")])
def test_unknown_accelerator_types_are_named(name, match):
  with pytest.raises(ValueError, match=match):
    parse_slice(name)


def test_model_flops_follow_the_formula():
  """6 x (block weights + LM head) x tokens + 12 L H K T x tokens, written out here for the 300M preset."""
  cfg = load_preset(PRESET)
  m = cfg.model
  tokens = cfg.train.batch_size * cfg.data.seq_len
  per_layer = 4 * m.d_model * m.d_model + 3 * m.d_model * m.d_ff  # q, k, v, o; gate, up, down (no grouping here)
  want = 6 * (m.num_layers * per_layer + m.d_model * m.vocab_size) * tokens
  want += 12 * m.num_layers * m.num_heads * m.head_size * cfg.data.seq_len * tokens
  assert model_flops(cfg)["dense"] == pytest.approx(want, rel=1e-12)
  assert model_flops(apply_overrides(cfg, ["model.remat=none"]))["recompute"] == 0
  assert model_flops(apply_overrides(cfg, ["model.remat=full"]))["recompute"] > 0


def qsparse_compile(*args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, "-m", "qsparse_jax.cli", "compile", *args], capture_output=True, text=True,
                        cwd=root, timeout=900)


@needs_libtpu
def test_compile_reports_what_fits_a_slice():
  result = qsparse_compile("--config", PRESET, "--topology", "v5p-8", *SMALL)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith("slice: v5p-8 = 4 v5p chips (v5p:2x2x1), 95.0 GiB HBM")
  assert lines[1] == "mesh: data 1 x fsdp 4 x tensor 1"
  peak = float(re.search(r"peak +([\d.]+) GiB of +95.00 GiB", result.stdout).group(1))
  fraction = float(lines[-1].removeprefix("hbm_fraction: "))
  assert 0 < fraction < 1 and fraction == pytest.approx(peak / 95.0, abs=2e-3)
  compiled, dense = map(float, re.search(r"program ([\d.e+]+); model ([\d.e+]+) dense", result.stdout).groups())
  assert compiled == pytest.approx(dense, rel=0.10)  # XLA's count of the step within 10% of 6NT + attention


@needs_libtpu
def test_compile_names_what_to_change_when_it_does_not_fit():
  result = qsparse_compile("--config", PRESET, "--topology", "v5e-4", "model.num_layers=1", "model.remat=none",
                           "train.microbatches=1")
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("qsparse compile:")]
  assert len(errors) == 1 and re.fullmatch(
      r"qsparse compile: error: configs/paper_300m.py does not fit v5e-4 \([\d.]+ GiB of temporaries per chip, beyond "
      r"its [\d.]+ GiB\); try model.remat=full, then train.microbatches=2, then a larger slice", errors[0]), errors
  assert "hbm_fraction" not in result.stdout


@needs_libtpu
def test_compile_decode_reports_weights_and_cache():
  """generate's decode step at 8 rows over a 512-token cache on a v5p-8 (FSDP over 4 chips): each chip holds a quarter
  of the float32 weights and, the rows split 4 ways, a quarter of the bfloat16 cache."""
  result = qsparse_compile("--decode", "--batch", "8", "--context", "512", "--config", PRESET, "--topology", "v5p-8",
                           "model.num_layers=1")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[2] == "decode step: 8 rows x 1 token, KV cache of 512 tokens (rows split over data x fsdp)"
  m = apply_overrides(load_preset(PRESET), ["model.num_layers=1"]).model
  weights, cache = map(float, re.search(r"weights +([\d.]+) GiB, KV cache +([\d.]+) GiB", result.stdout).groups())
  assert weights == pytest.approx(4 * count_params(m)["total"] / 4 / 2**30, abs=0.006)
  assert cache == pytest.approx(2 * m.num_layers * 8 * 512 * m.kv_heads * m.head_size * 2 / 4 / 2**30, abs=0.006)
  peak = float(re.search(r"peak +([\d.]+) GiB of +95.00 GiB", result.stdout).group(1))
  assert peak >= weights + cache - 0.01
  assert float(lines[-1].removeprefix("hbm_fraction: ")) == pytest.approx(peak / 95.0, abs=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is not None,
                    reason="this environment has jax's CUDA plugin, so GPU targets compile here")
def test_gpu_targets_without_the_cuda_plugin_say_how_to_get_it():
  result = qsparse_compile("--config", PRESET, "--topology", "h200x8")
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip() == ("qsparse compile: error: compiling for a GPU needs jax's CUDA plugin, which this "
                                   "environment lacks: run scripts/cuda_compile_env.sh (it makes .venv-cuda) and run "
                                   ".venv-cuda/bin/qsparse compile ... there")
