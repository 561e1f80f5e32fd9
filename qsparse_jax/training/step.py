"""The jitted Q-Sparse language-model step: pure functions of a train state {"step", "params", "opt_state"} and a batch.

Next-token cross-entropy (for supervised fine-tuning, on response tokens only: response_loss), gradients through the
top-K masks by the straight-through estimator (method.md §2), an optax update. With a mesh, the state keeps its
shardings and the batch is split over (data, fsdp).

Shapes: B batch, T time, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from qsparse_jax.nn.model import ModelConfig, Transformer
from qsparse_jax.parallel import sharding


def init_model(cfg: ModelConfig, seed: int):
  """(graphdef, params) of a freshly initialised Transformer."""
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh: Mesh | None = None):
  """(graphdef, state) with state = {"step", "params", "opt_state"}.

  With a mesh, every array is created already sharded (one jitted initialisation with out_shardings): no host
  ever holds the whole model.
  """
  def init():
    _, params = init_model(cfg, seed)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))))
  if mesh is None:
    return graphdef, init()
  shardings = sharding.train_state_shardings(jax.eval_shape(init), tx, mesh)
  return graphdef, jax.jit(init, out_shardings=shardings)()


def lm_loss(graphdef, params, tokens_bt: jax.Array, *, reduce: bool = True):
  """Mean next-token cross-entropy (nats/token) of tokens [B, T+1]: inputs [:, :-1], targets [:, 1:].

  reduce=False: (sum of the token losses, number of tokens), the terms micro-batches add up.
  """
  logits_btv = nnx.merge(graphdef, params)(tokens_bt[:, :-1])
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt[:, 1:])
  return nll_bt.mean() if reduce else (jnp.sum(nll_bt), jnp.asarray(nll_bt.size, jnp.float32))


def response_loss(graphdef, params, batch: dict[str, jax.Array], *, reduce: bool = True):
  """Mean next-token cross-entropy over response tokens only, of packed instruction rows (data.instructions.sft_batches:
  "tokens", "loss_mask", "segment_ids", "positions", each [B, T+1]).

  Each conversation of a row sees only itself (segment ids in the attention mask, positions restarting at 0); a
  target counts when its loss mask is 1 and it belongs to the same conversation as its input token.
  reduce=False: (sum of the counted token losses, number counted).
  """
  tokens_bt, segments_bt = batch["tokens"], batch["segment_ids"]
  logits_btv = nnx.merge(graphdef, params)(tokens_bt[:, :-1], batch["positions"][:, :-1], segments_bt[:, :-1])
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt[:, 1:])
  counted_bt = (batch["loss_mask"][:, 1:] > 0) & (segments_bt[:, 1:] == segments_bt[:, :-1]) & (segments_bt[:, 1:] > 0)
  total, count = jnp.sum(jnp.where(counted_bt, nll_bt, 0.0)), jnp.sum(counted_bt).astype(jnp.float32)
  return total / jnp.maximum(count, 1) if reduce else (total, count)


def split_microbatches(batch, microbatches: int):
  """Every [B, ...] array of batch as [M, B/M, ...]: micro-batch m takes rows m, m + M, m + 2M, ... so that each
  device's block of rows (the batch is split over (data, fsdp)) feeds every micro-batch equally."""
  def split(x):
    rows = x.shape[0]
    if rows % microbatches:
      raise ValueError(f"the batch of {rows} rows does not split into train.microbatches={microbatches}")
    x = x.reshape(rows // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def loss_and_grads(graphdef, params, batch, loss_fn: Callable = lm_loss, microbatches: int = 1):
  """(mean loss, its gradient) over the batch. With microbatches M > 1 the batch is cut into M micro-batches run one
  after the other in a lax.scan, whose summed losses and gradients are divided by the batch's count once: the same
  mean as one pass over the whole batch, with the activations of one micro-batch alive at a time."""
  if microbatches == 1:
    return jax.value_and_grad(lambda p: loss_fn(graphdef, p, batch))(params)
  terms = jax.value_and_grad(lambda p, mb: loss_fn(graphdef, p, mb, reduce=False), has_aux=True)

  def accumulate(carry, microbatch):
    grads, total, count = carry
    (mb_total, mb_count), mb_grads = terms(params, microbatch)
    return (jax.tree.map(jnp.add, grads, mb_grads), total + mb_total, count + mb_count), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, total, count), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros(()), jnp.zeros(())),
                                          split_microbatches(batch, microbatches))
  count = jnp.maximum(count, 1)
  return total / count, jax.tree.map(lambda g: g / count, grads)


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh: Mesh | None = None,
                    state_shardings=None, loss_fn: Callable = lm_loss, microbatches: int = 1) -> Callable:
  """train_step(state, batch) -> (state, metrics), jitted with the state donated; batch is what loss_fn takes
  (lm_loss: tokens [B, T+1]; response_loss: a dict of [B, T+1] arrays).

  microbatches: gradient accumulation over that many micro-batches of the batch (loss_and_grads).
  With a mesh (and the state's shardings), the step is compiled for it: state in and out keep their shardings,
  the batch is split over (data, fsdp), metrics are replicated.
  """

  def train_step(state, batch):
    loss, grads = loss_and_grads(graphdef, state["params"], batch, loss_fn, microbatches)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  if mesh is None:
    return jax.jit(train_step, donate_argnums=0)
  return sharding.jit_on_mesh(train_step, mesh, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                              out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(graphdef, mesh: Mesh | None = None, param_shardings=None, loss_fn: Callable = lm_loss
                   ) -> Callable:
  """eval_step(params, batch) -> mean loss (loss_fn: lm_loss or response_loss)."""
  loss = lambda params, batch: loss_fn(graphdef, params, batch)  # noqa: E731
  if mesh is None:
    return jax.jit(loss)
  return sharding.jit_on_mesh(loss, mesh, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                              out_shardings=sharding.replicated(mesh))
