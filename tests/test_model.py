"""The decoder: parameter counts of the presets (without memory), causality, and the sparsity sites."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.config import load_preset
from qsparse_jax.nn.model import ModelConfig, Transformer, activated_params_per_token, count_params

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def expected_params(m: ModelConfig) -> int:
  """Independent count: per layer q/k/v/o + gate/up/down + two norm scales; embeddings; final norm."""
  hk, kvk = m.num_heads * m.head_size, m.kv_heads * m.head_size
  attention = m.d_model * (hk + 2 * kvk) + hk * m.d_model + (hk + 2 * kvk if m.qkv_bias else 0)
  per_layer = attention + 3 * m.d_model * m.d_ff + 2 * m.d_model
  embeddings = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
  return m.num_layers * per_layer + embeddings + m.d_model


# Nominal sizes of method.md §7. The paper names 300M/700M by non-embedding parameters and 1.3B/7B by the total with
# a 32k vocabulary (Llama's convention); each preset must land within 8% of its name.
@pytest.mark.parametrize("preset, nominal, counted", [
    ("paper_300m.py", 300e6, "non_embedding"), ("paper_700m.py", 700e6, "non_embedding"),
    ("paper_1p3b.py", 1.3e9, "total"), ("paper_7b.py", 7e9, "total")])
def test_paper_presets_have_the_papers_sizes(preset, nominal, counted):
  cfg = load_preset(CONFIGS / preset).model
  counts = count_params(cfg)  # nnx.eval_shape: nothing is allocated, even for 7B
  assert counts["total"] == expected_params(cfg)
  assert abs(counts[counted] - nominal) / nominal < 0.08, counts


def test_tiny_preset_counts_and_activated_parameters():
  cfg = load_preset(CONFIGS / "tiny.py").model
  counts = count_params(cfg)
  assert counts["total"] == expected_params(cfg)
  # Top-K 70% at every site: each projection multiplies 70% of its inputs' weights.
  np.testing.assert_allclose(activated_params_per_token(cfg), 0.7 * (counts["non_embedding"] - cfg.d_model *
                                                                    (2 * cfg.num_layers + 1)), rtol=1e-12)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_logits_are_causal(sparsity):
  cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                    max_seq_len=16).with_sparsity(sparsity)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 50)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 50)
  a, b = model(tokens), model(changed)
  assert a.shape == (2, 12, 50) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a[:, :7], b[:, :7])  # top-K is per token: no information flows backwards
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_sparsity_changes_the_function_but_not_the_parameters():
  dense_cfg = ModelConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=2, d_ff=48)
  dense = Transformer(dense_cfg, rngs=nnx.Rngs(0))
  sparse = Transformer(dense_cfg.with_sparsity(0.5), rngs=nnx.Rngs(0))
  for x, y in zip(jax.tree.leaves(nnx.state(dense)), jax.tree.leaves(nnx.state(sparse))):
    np.testing.assert_array_equal(x, y)
  tokens = jnp.arange(10)[None] % 40
  assert not np.allclose(dense(tokens), sparse(tokens))


def test_bad_model_config():
  with pytest.raises(ValueError, match=r"^model: sparsity must be in \[0, 1\)"):
    ModelConfig(sparsity_down=1.2)
  with pytest.raises(ValueError, match="model.num_heads=6 must be a multiple of model.num_kv_heads=4"):
    ModelConfig(d_model=48, num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="model.dtype must be one of"):
    ModelConfig(dtype="float8")


def test_bfloat16_compute_tracks_float32():
  """Same float32 parameters, bfloat16 activations: logits agree to bfloat16 precision (8 mantissa bits: ~1e-2
  relative per op, a few such ops deep here, so atol 0.1 on O(1) logits)."""
  cfg = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, d_ff=128).with_sparsity(0.3)
  f32 = Transformer(cfg, rngs=nnx.Rngs(0))
  bf16 = Transformer(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  a, b = np.asarray(f32(tokens)), np.asarray(bf16(tokens))
  assert b.dtype == np.float32  # logits are always float32
  np.testing.assert_allclose(b, a, atol=0.1)
  assert not np.array_equal(a, b)  # the compute dtype really changed
