"""The train step at scale's settings: micro-batched gradient accumulation, rematerialised blocks and blocks scanned
over stacked parameters compute the update of the plain step (float32); remat really trades memory for recompute,
and the scanned program does not grow with depth."""

import dataclasses
import pathlib
import runpy

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


def assert_grads_close(got, expected):
  """float32 gradients summed in another order: each entry within 1e-5 of itself, or of its leaf's largest entry
  (a sum whose terms cancel, such as the embedding's over the tokens, keeps the ulps of the terms, not of the result:
  1.5e-7 absolute on an entry of 8e-4 was seen on an AMD EPYC Zen 5)."""
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    e = np.asarray(e)
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()),
                               err_msg=jax.tree_util.keystr(path))


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
  assert_grads_close(mb_grads, grads)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_remat_and_scan_compute_the_same_gradients(remat, scan_layers):
  if remat == "none" and not scan_layers:
    pytest.skip("the plain step itself")
  cfg = dataclasses.replace(CFG, num_layers=3)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  remat_graphdef, _ = nnx.split(Transformer(dataclasses.replace(cfg, remat=remat, scan_layers=scan_layers),
                                            rngs=nnx.Rngs(0)))
  grad = jax.jit(jax.value_and_grad(lm_loss, argnums=1), static_argnums=0)
  loss, grads = grad(graphdef, params, tokens())
  remat_loss, remat_grads = grad(remat_graphdef, params, tokens())
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  assert_grads_close(remat_grads, grads)


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


def test_scanned_program_does_not_grow_with_depth():
  """The compiled gradient with scanned blocks is about the same size at 2 and 8 layers (one block body, plus each
  layer's parameters stacked and its gradient sliced out); unrolled, it grows about fourfold (measured: 5% and 3.9x).
  Compile time follows the program's size."""
  def compiled_chars(num_layers, scan_layers):
    cfg = dataclasses.replace(CFG, num_layers=num_layers, scan_layers=scan_layers, remat="full")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    grad = jax.jit(jax.grad(lm_loss, argnums=1), static_argnums=0)
    return len(grad.lower(graphdef, params, tokens()).compile().as_text())

  scanned, unrolled = [compiled_chars(n, True) for n in (2, 8)], [compiled_chars(n, False) for n in (2, 8)]
  assert scanned[1] < 1.25 * scanned[0], scanned
  assert unrolled[1] > 3 * unrolled[0], unrolled


def run_steps(cfg, tx, steps, *, mesh=None, microbatches=1, length=17):
  """The losses of `steps` train steps from seed 0 on two alternating batches."""
  graphdef, state = init_train_state(cfg, tx, seed=0, mesh=mesh)
  shardings = None if mesh is None else train_state_shardings(state, tx, mesh)
  step = make_train_step(graphdef, tx, mesh, shardings, microbatches=microbatches)
  losses = []
  for i in range(steps):
    state, metrics = step(state, tokens(length=length, seed=100 + i % 2))
    losses.append(float(metrics["loss"]))
  return losses


def test_scanned_rematerialised_step_on_the_tiny_preset_follows_the_plain_step():
  """20 steps of AdamW on the tiny preset's model (configs/tiny.py) with its blocks scanned and rematerialised give
  the plain step's losses: float32, relative 1e-5 while the top-K selections agree (measured 1e-7 for 8 steps: the
  same sums, fused differently in a loop). Then a rounding-level difference moves an activation across its row's
  threshold, a different entry is kept, and the runs part by a few 1e-3 (measured 2.6e-3 at step 14); a scan that
  skipped, repeated or reordered a block would differ by far more from the first step."""
  tiny = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"))["config"].model
  tx = optax.adamw(3e-3)
  plain = run_steps(tiny, tx, 20, length=65)
  fast = run_steps(dataclasses.replace(tiny, remat="full", scan_layers=True), tx, 20, length=65)
  np.testing.assert_allclose(fast[:8], plain[:8], rtol=1e-5)
  np.testing.assert_allclose(fast, plain, rtol=1e-2)
  assert plain[-1] < plain[0]


def test_scanned_microbatched_rematerialised_step_on_a_mesh_follows_the_plain_step():
  """20 steps of AdamW: scanned, rematerialised, micro-batched (4), sharded over (data 2, fsdp 2, tensor 2) against
  the plain single-device step: the same losses (float32, relative 1e-5).

  A small model: micro-batches and shards add float32 sums in another order, and where that moves an activation
  across its row's top-K threshold the selection changes and the runs part by more than rounding (on the tiny
  preset, 2e-5 after one step and 5e-3 after eight). This model's selections do not flip in 20 steps."""
  tx = optax.adamw(1e-2)
  plain = run_steps(CFG, tx, 20)
  fast = run_steps(dataclasses.replace(CFG, remat="full", scan_layers=True), tx, 20,
                   mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), microbatches=4)
  np.testing.assert_allclose(fast, plain, rtol=1e-5)
  assert plain[-1] < plain[0]
