"""The train step at scale's settings: micro-batched gradient accumulation and rematerialised blocks compute the
update of the plain step (float32), and remat really trades memory for recompute."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qsparse_jax.nn.model import ModelConfig, Transformer
from qsparse_jax.parallel.sharding import MeshConfig, make_mesh, train_state_shardings
from qsparse_jax.training.step import init_train_state, lm_loss, loss_and_grads, make_train_step, response_loss

CFG = ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=32,
                  activation="silu").with_sparsity(0.4)


def tokens(rows=8, length=17, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 257, (rows, length)), jnp.int32)


def instruction_batch(rows=8, length=17, seed=1):
  """Packed rows of two conversations each, with a loss mask on part of every conversation (uneven counts per row,
  so a mean of per-micro-batch means would differ from the batch mean)."""
  rng = np.random.default_rng(seed)
  cut = rng.integers(3, length - 3, rows)
  segments = np.where(np.arange(length)[None] < cut[:, None], 1, 2).astype(np.int32)
  positions = np.where(segments == 1, np.arange(length)[None], np.arange(length)[None] - cut[:, None]).astype(np.int32)
  mask = (rng.random((rows, length)) < np.linspace(0.1, 0.9, rows)[:, None]).astype(np.int32)
  return {"tokens": tokens(rows, length, seed), "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(segments),
          "positions": jnp.asarray(positions)}


@pytest.mark.parametrize("loss_fn, batch", [(lm_loss, tokens()), (response_loss, instruction_batch())],
                         ids=["lm_loss", "response_loss"])
@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatched_gradients_equal_the_whole_batch(loss_fn, batch, microbatches):
  graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  loss, grads = jax.jit(loss_and_grads, static_argnums=(0, 3, 4))(graphdef, params, batch, loss_fn, 1)
  mb_loss, mb_grads = jax.jit(loss_and_grads, static_argnums=(0, 3, 4))(graphdef, params, batch, loss_fn,
                                                                        microbatches)
  # float32 sums in another order: a few ulps of the loss, relative 1e-5 of each gradient.
  np.testing.assert_allclose(mb_loss, loss, rtol=1e-6)
  chex.assert_trees_all_close(mb_grads, grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_computes_the_same_gradients(remat):
  graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  remat_graphdef, _ = nnx.split(Transformer(dataclasses.replace(CFG, remat=remat), rngs=nnx.Rngs(0)))
  grad = jax.jit(jax.value_and_grad(lm_loss, argnums=1), static_argnums=0)
  loss, grads = grad(graphdef, params, tokens())
  remat_loss, remat_grads = grad(remat_graphdef, params, tokens())
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  chex.assert_trees_all_close(remat_grads, grads, rtol=1e-5, atol=1e-7)


def test_full_remat_recomputes_the_forward_in_the_backward_pass():
  """Compiled, a 4-layer model's gradient costs about one more forward with remat="full" (what it buys, fewer bytes
  kept for the backward pass, is measured where memory is scarce: the TPU compile of `qsparse compile`)."""
  deep = dataclasses.replace(CFG, num_layers=4)
  flops = {}
  for remat in ("none", "full"):
    graphdef, params = nnx.split(Transformer(dataclasses.replace(deep, remat=remat), rngs=nnx.Rngs(0)))
    cost = jax.jit(jax.grad(lm_loss, argnums=1), static_argnums=0).lower(graphdef, params, tokens()).cost_analysis()
    flops[remat] = (cost[0] if isinstance(cost, list) else cost)["flops"]
  # forward F, backward about 2F: full remat adds most of one F to 3F
  assert 1.15 * flops["none"] < flops["full"] < 1.5 * flops["none"], flops


def test_microbatched_rematerialised_step_on_a_mesh_follows_the_plain_step():
  """20 steps of AdamW: micro-batched (4), rematerialised, sharded over (data 2, fsdp 2, tensor 2) against the plain
  single-device step: the same losses (float32, relative 1e-5)."""
  tx = optax.adamw(1e-2)
  plain_graphdef, state = init_train_state(CFG, tx, seed=0)
  fast_cfg = dataclasses.replace(CFG, remat="full")
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  fast_graphdef, fast_state = init_train_state(fast_cfg, tx, seed=0, mesh=mesh)
  shardings = train_state_shardings(fast_state, tx, mesh)
  plain = make_train_step(plain_graphdef, tx)
  fast = make_train_step(fast_graphdef, tx, mesh, shardings, microbatches=4)
  plain_losses, fast_losses = [], []
  for i in range(20):
    batch = tokens(seed=100 + i % 2)
    state, metrics = plain(state, batch)
    fast_state, fast_metrics = fast(fast_state, batch)
    plain_losses.append(float(metrics["loss"]))
    fast_losses.append(float(fast_metrics["loss"]))
  np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-5)
  assert plain_losses[-1] < plain_losses[0]
