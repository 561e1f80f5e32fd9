"""qsparse_jax.inference.evaluation: measured sparsity, activated parameters and loss against computations made here."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.inference.evaluation import PROJECTION_TYPES, evaluate
from qsparse_jax.nn.model import ModelConfig, Transformer, activated_params_per_token
from qsparse_jax.ops.sparsity import keep_count
from qsparse_jax.training.step import lm_loss

BASE = ModelConfig(vocab_size=257, d_model=64, num_layers=2, num_heads=4, d_ff=96, max_seq_len=64)


def batches(n=2):
  rng = np.random.default_rng(0)
  return [rng.integers(0, 257, (2, 33)).astype(np.int32) for _ in range(n)]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
def test_silu_model_measures_the_configured_top_k_and_the_loss_of_train(scan_layers):
  # SiLU GLU products and normalized inputs hold no exact zeros: each site's measured sparsity is 1 - K/D exactly.
  # A model trained with its blocks scanned is measured layer by layer all the same (the same parameters).
  cfg = dataclasses.replace(BASE, activation="silu", sparsity_qkv=0.25, sparsity_out=0.5, sparsity_up=0.4,
                            sparsity_down=0.6, scan_layers=scan_layers)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  result = evaluate(graphdef, params, cfg, batches(), step=7)
  hk = cfg.num_heads * cfg.head_size
  want = {"q/k/v": 1 - keep_count(64, 0.25) / 64, "out": 1 - keep_count(hk, 0.5) / hk,
          "up": 1 - keep_count(64, 0.4) / 64, "gate": 1 - keep_count(64, 0.4) / 64,
          "down": 1 - keep_count(96, 0.6) / 96}
  assert result.sparsity == pytest.approx(want, abs=1e-12)
  assert result.configured == {"q/k/v": 0.25, "out": 0.5, "up": 0.4, "gate": 0.4, "down": 0.6}
  # The configured count, with each site's rounding of K: the same activated parameters.
  rounded = dataclasses.replace(cfg, sparsity_qkv=want["q/k/v"], sparsity_out=want["out"], sparsity_up=want["up"],
                                sparsity_down=want["down"])
  assert result.activated_params == pytest.approx(activated_params_per_token(rounded), rel=1e-9)
  assert result.overall == pytest.approx(1 - result.activated_params / result.total_params)
  # Loss: the mean of train's loss over the batches (equal token counts), in float32.
  want_loss = np.mean([float(jax.jit(lm_loss, static_argnums=0)(graphdef, params, jnp.asarray(b)))
                       for b in batches()])
  assert result.loss == pytest.approx(want_loss, rel=1e-5)
  assert result.tokens == 2 * 2 * 32 and result.step == 7
  assert result.as_json()["perplexity"] == pytest.approx(np.exp(result.loss))


def test_relu2_down_projection_counts_the_zeros_of_the_glu_product():
  # ReLU² zeroes the GLU product wherever the gate is negative: the down input is sparser than configured, and the
  # count equals the zeros of act(gate(x̃)) ⊙ up(x̃) computed here from the model's own first block.
  cfg = dataclasses.replace(BASE, num_layers=1, activation="relu2", sparsity_down=0.0).with_sparsity(0.0)
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model)
  tokens = batches(1)[0]
  result = evaluate(graphdef, params, cfg, [tokens])
  block = model.blocks[0]
  x = jnp.take(model.embed[...], jnp.asarray(tokens[:, :-1]), axis=0)
  x = x + block.attn(block.attn_norm(x), jnp.broadcast_to(jnp.arange(32), (2, 32)))
  h = np.asarray(block.ffn_norm(x))
  gate, up = h @ np.asarray(block.ffn.gate_proj.kernel[...]), h @ np.asarray(block.ffn.up_proj.kernel[...])
  hidden = np.square(np.maximum(gate, 0)) * up
  assert result.sparsity["down"] == pytest.approx(np.mean(hidden == 0), abs=1e-12)
  assert result.sparsity["down"] > 0.3  # about half the gates are negative
  assert all(result.sparsity[t] == 0 for t in ("q/k/v", "out", "up", "gate"))
  weights = {"down": cfg.d_ff * cfg.d_model}
  assert result.total_params - result.activated_params == pytest.approx(result.sparsity["down"] * weights["down"])


def test_table_names_every_projection_type():
  cfg = BASE.with_sparsity(0.3)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  table = evaluate(graphdef, params, cfg, batches(1)).table()
  header = table.splitlines()[1].split()
  assert header == list(PROJECTION_TYPES) + ["overall", "activated"]
  with pytest.raises(ValueError, match="no validation batches"):
    evaluate(graphdef, params, cfg, [])
