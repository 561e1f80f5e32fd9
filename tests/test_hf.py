"""Hugging Face import/export against transformers' own models (tiny, random, made here; no download)."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from qsparse_jax import hf  # noqa: E402
from qsparse_jax.hf import safetensors_io  # noqa: E402
from qsparse_jax.nn.model import Transformer  # noqa: E402
from qsparse_jax.parallel.sharding import MeshConfig, make_mesh  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=128)
FAMILIES = {
    # Llama 3.1-style RoPE scaling, separate lm_head
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(rope_theta=50000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                   tie_word_embeddings=False)),
    # linear RoPE scaling, tied embeddings, a sliding window longer than the context used
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True,
                     sliding_window=64)),
    # q/k/v biases, tied embeddings, head_dim != hidden / heads
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, head_dim=24, rope_theta=1e6)),
}


def make_hf_model(family: str, directory: pathlib.Path, dtype=torch.float32):
  config_cls, model_cls, extra = FAMILIES[family]
  torch.manual_seed(0)
  model = model_cls(config_cls(**COMMON, **extra)).eval()
  if family == "qwen2":  # transformers initializes biases to zero: give them values so they are tested
    with torch.no_grad():
      for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0.0, 0.2)
  model = model.to(dtype)
  model.save_pretrained(directory)
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def our_logits(cfg, params, tokens):
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(tokens)))


TOKENS = np.random.default_rng(0).integers(0, 96, (2, 48))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_gives_transformers_logits_and_export_round_trips(family, tmp_path):
  model = make_hf_model(family, tmp_path / "hf")
  cfg, params = hf.load_pretrained(tmp_path / "hf")
  want = hf_logits(model, TOKENS)
  # float32 on both sides, the same operations in another order: a few ulps of the O(1) logits per layer.
  scale = np.abs(want).max()
  np.testing.assert_allclose(our_logits(cfg, params, TOKENS), want, rtol=1e-4, atol=1e-5 * scale)
  assert cfg.max_seq_len == (64 if family == "mistral" else 128)

  # Export (with Q-Sparse settings recorded) -> transformers loads it and computes the same logits (dense).
  sparse_cfg = cfg.with_sparsity(0.3)
  out = hf.save_pretrained(tmp_path / "out", sparse_cfg, params, kind=family)
  exported = json.loads((out / "config.json").read_text())
  assert exported["qsparse"]["sparsity_qkv"] == 0.3 and exported["model_type"] == family
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(hf_logits(reloaded, TOKENS), want, rtol=1e-6, atol=1e-6 * scale)
  # ... and import -> export -> import is bit-exact, with the sparsity settings back.
  cfg2, params2 = hf.load_pretrained(out)
  assert cfg2 == sparse_cfg
  for (path, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(params2)):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_bfloat16_checkpoints_round_trip_bit_exact_through_shards(tmp_path):
  make_hf_model("qwen2", tmp_path / "hf", dtype=torch.bfloat16)
  cfg, params = hf.load_pretrained(tmp_path / "hf")
  out = hf.save_pretrained(tmp_path / "out", cfg, params, dtype=jnp.bfloat16, max_shard_bytes=40_000)
  index = json.loads((out / safetensors_io.INDEX).read_text())
  assert len(set(index["weight_map"].values())) > 2
  original = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
  mine = {}
  for file in set(index["weight_map"].values()):
    mine.update(safetensors_torch.load_file(out / file))
  assert set(mine) == set(original) - {"lm_head.weight"}
  for name, tensor in original.items():
    if name in mine:
      assert mine[name].dtype == torch.bfloat16 and torch.equal(mine[name], tensor), name


def test_sharded_import_reads_each_device_its_shard(tmp_path):
  make_hf_model("llama", tmp_path / "hf")
  _, whole = hf.load_pretrained(tmp_path / "hf")
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  cfg, params = hf.load_pretrained(tmp_path / "hf", mesh=mesh)
  kernel = params["blocks"][0]["ffn"]["up_proj"]["kernel"][...]
  assert kernel.sharding.mesh.shape == mesh.shape and not kernel.sharding.is_fully_replicated
  assert kernel.addressable_shards[0].data.shape == (32, 56)  # [64, 112] over fsdp x tensor
  for (path, a), (_, b) in zip(nnx.to_flat_state(whole), nnx.to_flat_state(params)):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


def test_bad_checkpoints_are_named_and_leave_nothing_behind(tmp_path, monkeypatch):
  make_hf_model("llama", tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())

  def variant(name, **changes):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**config, **changes}))
    (d / "model.safetensors").symlink_to(tmp_path / "hf" / "model.safetensors")
    return d

  with pytest.raises(hf.UnsupportedModelError, match=r"unsupported architecture 'GPT2LMHeadModel' \(model_type "
                     r"'gpt2'\); supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
    hf.load_pretrained(variant("gpt2", model_type="gpt2", architectures=["GPT2LMHeadModel"]))
  with pytest.raises(hf.SafetensorsError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[112, 64\], "
                     r"but config.json implies \[128, 64\]"):
    hf.load_pretrained(variant("shape", intermediate_size=128))
  with pytest.raises(hf.SafetensorsError, match=r"tensor \S+ is stored as F32, but config.json declares dtype "
                     r"'bfloat16' \(BF16\)"):
    hf.load_pretrained(variant("dtype", torch_dtype="bfloat16", dtype="bfloat16"))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_pretrained(tmp_path)
  _, params = hf.load_pretrained(tmp_path / "hf")
  cfg = hf.from_hf(config)
  out = hf.save_pretrained(tmp_path / "sharded", cfg, params, max_shard_bytes=30_000)
  shard = sorted(out.glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=f"missing shard\\(s\\) of .*: {shard.name}"):
    hf.load_pretrained(out)
  with pytest.raises(FileExistsError, match="already exists; export into a new directory"):
    hf.save_pretrained(out, cfg, params)
  umask = os.umask(0o022)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder like any other, not mkdtemp's private 0700
  index = json.loads((out / safetensors_io.INDEX).read_text())
  index["weight_map"][next(iter(index["weight_map"]))] = "../hf/model.safetensors"
  (out / safetensors_io.INDEX).write_text(json.dumps(index))
  with pytest.raises(hf.SafetensorsError, match=r"names shard '../hf/model.safetensors', which is not a file name "
                     r"inside .*; shards must sit beside the index"):
    hf.load_pretrained(out)
  # A write that fails half way (the second shard) leaves no directory and no staging folder.
  real_save = safetensors_io.save_file
  calls = []

  def failing_save(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    real_save(tensors, path, metadata)

  monkeypatch.setattr(safetensors_io, "save_file", failing_save)
  before = set(tmp_path.iterdir())
  with pytest.raises(OSError, match="No space left"):
    hf.save_pretrained(tmp_path / "partial", cfg, params, max_shard_bytes=30_000)
  assert set(tmp_path.iterdir()) == before
  with pytest.raises(hf.UnsupportedModelError, match="uses activation 'relu2'"):
    hf.to_hf(cfg.__class__(activation="relu2"))


def test_init_from_a_hugging_face_model_checks_the_config(tmp_path):
  from qsparse_jax.training.init_from import load_initial_params

  make_hf_model("qwen2", tmp_path / "hf")
  cfg, whole = hf.load_pretrained(tmp_path / "hf")
  mesh = make_mesh(MeshConfig(data=2, fsdp=4))
  params = load_initial_params(f"hf:{tmp_path / 'hf'}", cfg.with_sparsity(0.3), mesh)
  for (path, a), (_, b) in zip(nnx.to_flat_state(whole), nnx.to_flat_state(params)):
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
  with pytest.raises(ValueError, match=r"its model has num_layers=2, this config num_layers=3"):
    load_initial_params(f"hf:{tmp_path / 'hf'}", cfg.__class__(**{**cfg.__dict__, "num_layers": 3}), mesh)


def test_export_command_writes_what_transformers_runs(tmp_path):
  import dataclasses
  import os
  import subprocess
  import sys

  from qsparse_jax.training.checkpoint import Checkpointer, meta_json
  from qsparse_jax.config import Config
  from qsparse_jax.nn.model import ModelConfig
  from qsparse_jax.training.optimizer import make_optimizer
  from qsparse_jax.training.step import init_train_state

  model_cfg = ModelConfig(vocab_size=257, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=112,
                          activation="silu", tie_embeddings=False).with_sparsity(0.3)
  config = Config(model=model_cfg)
  _, state = init_train_state(model_cfg, make_optimizer(config.train), seed=3)
  checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
  checkpointer.save(1, state, meta=meta_json(config), force=True)
  checkpointer.close()

  def export(*args):
    command = [sys.executable, "-m", "qsparse_jax.cli", "export-hf", "--checkpoint", str(tmp_path / "run"), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})

  done = export("--out", str(tmp_path / "hf"), "--arch", "mistral")
  assert done.returncode == 0, done.stderr
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  assert type(reloaded).__name__ == "MistralForCausalLM"
  dense = dataclasses.replace(model_cfg, sparsity_qkv=0.0, sparsity_out=0.0, sparsity_up=0.0, sparsity_down=0.0)
  want = our_logits(dense, state["params"], TOKENS)  # transformers runs the weights dense
  np.testing.assert_allclose(hf_logits(reloaded, TOKENS), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  again = export("--out", str(tmp_path / "hf"))
  assert again.returncode == 2 and again.stderr.strip().splitlines() == [
      f"qsparse export-hf: error: {str(tmp_path / 'hf')!r} already exists; export into a new directory"]
