"""Sharded training on 8 CPU devices gives the loss and gradients of one device (method-independent checks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse_jax.parallel import sharding
from qsparse_jax.config import TrainConfig
from qsparse_jax.nn.model import ModelConfig
from qsparse_jax.training.optimizer import make_optimizer
from qsparse_jax.training.step import init_train_state, lm_loss, make_train_step

CFG = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128,
                  max_seq_len=16).with_sparsity(0.3)


def test_mesh_shapes_and_errors():
  assert sharding.MeshConfig(data=-1, tensor=2).shape(8) == (4, 1, 2)
  assert sharding.make_mesh(sharding.MeshConfig(2, 2, 2)).axis_names == ("data", "fsdp", "tensor")
  with pytest.raises(ValueError, match="needs 12 devices, 8 are available"):
    sharding.MeshConfig(2, 2, 3).shape(8)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.MeshConfig(-1, -1, 1).shape(8)


def test_rules_refuse_two_axes_on_one_mesh_axis():
  assert sharding.logical_to_mesh(("embed", "mlp")) == jax.sharding.PartitionSpec("fsdp", "tensor")
  with pytest.raises(ValueError, match="'mlp' and 'heads' of one tensor both map to mesh axis 'tensor'"):
    sharding.logical_to_mesh(("mlp", "heads"))


@pytest.fixture(scope="module")
def one_device():
  """The reference on one device: state, tokens, gradients and the step's metrics (computed once)."""
  tx = make_optimizer(TrainConfig(steps=10, warmup_steps=1))
  graphdef, state = init_train_state(CFG, tx, seed=0)
  tokens = jax.random.randint(jax.random.key(0), (8, 17), 0, 64)
  grads = jax.jit(jax.grad(lambda p: lm_loss(graphdef, p, tokens)))(state["params"])
  _, metrics = make_train_step(graphdef, tx)(jax.tree.map(jnp.copy, state), tokens)
  return tx, graphdef, state, tokens, grads, metrics


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8)])  # data, all three, tensor
def test_sharded_step_matches_one_device(shape, one_device):
  tx, graphdef, state, tokens, grads_1, metrics_1 = one_device

  mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
  # A copy: the step donates its state, and device_put may hand device 0 the reference's own buffers.
  sharded = sharding.shard_train_state(jax.tree.map(jnp.copy, state), tx, mesh)
  tokens_s = jax.device_put(tokens, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):  # the model's activation constraints apply
    grads_s = jax.jit(jax.grad(lambda p: lm_loss(graphdef, p, tokens_s)))(sharded["params"])
  step_s = make_train_step(graphdef, tx, mesh, jax.tree.map(lambda x: x.sharding, sharded))
  new_state, metrics_s = step_s(sharded, tokens_s)
  # float32; the sharded reductions sum in another order: a few ulps on O(1) values (top-K masks are exact).
  np.testing.assert_allclose(metrics_s["loss"], metrics_1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  if shape[1] * shape[2] > 1:  # FSDP or tensor axes: the large matrices must really be split
    sharding.assert_params_sharded(new_state["params"], min_size=64 * 128)


def _abstract_on(state, tx, mesh):
  """The abstract train state (shapes, dtypes and target shardings on `mesh`) to restore into."""
  placed = sharding.shard_train_state(jax.tree.map(jnp.copy, state), tx, mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), placed)


def test_checkpoint_restores_onto_other_meshes(tmp_path):
  from qsparse_jax.training.checkpoint import Checkpointer, CheckpointMismatchError

  tx = make_optimizer(TrainConfig(steps=10, warmup_steps=1))
  graphdef, state = init_train_state(CFG, tx, seed=0)
  step = make_train_step(graphdef, tx)
  mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
  trained, _ = step(sharding.shard_train_state(jax.tree.map(jnp.copy, state), tx, mesh),  # the step donates
                    jax.device_put(jax.random.randint(jax.random.key(1), (8, 17), 0, 64),
                                   sharding.batch_sharding(mesh)))
  checkpointer = Checkpointer(tmp_path / "ckpt")
  checkpointer.save(1, trained, force=True)
  checkpointer.wait()
  expected = jax.tree.map(np.asarray, trained)
  for shape in [(4, 1, 2), (1, 1, 1), (8, 1, 1)]:
    target_mesh = sharding.make_mesh(sharding.MeshConfig(*shape), jax.devices()[: int(np.prod(shape))])
    restored, _ = checkpointer.restore(_abstract_on(state, tx, target_mesh))
    for got, want, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(expected),
                              jax.tree.leaves(_abstract_on(state, tx, target_mesh))):
      np.testing.assert_array_equal(np.asarray(got), want)  # bit-identical values
      assert got.sharding == ref.sharding  # and laid out as the new mesh asks
  # A model of another shape: a clear error naming the first parameter that differs, not a shape traceback.
  other = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96)
  _, other_state = init_train_state(other, tx, seed=0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other_state)
  with pytest.raises(CheckpointMismatchError, match=r"does not match this model: .*down_proj/kernel.* has shape "
                                                    r"\(128, 64\) there, \(96, 64\) here"):
    checkpointer.restore(abstract)
  checkpointer.close()


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 2, 2)])
def test_tensor_parallel_step_never_gathers_a_whole_weight(shape):
  """With a tensor axis every projection kernel is split over heads or mlp; the compiled step may move activations
  and FSDP may gather its own split, but no kernel may be all-gathered back to its full shape."""
  import re

  # Widths chosen so that no partly gathered kernel has another kernel's full shape (e.g. [64, 192/2] != [64, 64]).
  cfg = ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=8, d_ff=192, max_seq_len=16).with_sparsity(0.3)
  tx = make_optimizer(TrainConfig(steps=10, warmup_steps=1))
  graphdef, state = init_train_state(cfg, tx, seed=0)
  mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
  sharded = sharding.shard_train_state(state, tx, mesh)
  tokens = jax.device_put(jax.random.randint(jax.random.key(0), (8, 17), 0, 64), sharding.batch_sharding(mesh))
  step = make_train_step(graphdef, tx, mesh, jax.tree.map(lambda x: x.sharding, sharded))
  hlo = step.lower(sharded, tokens).compile().as_text()
  gathered = {shape for shape in re.findall(r"= (f32\[[0-9,]+\])\{[^}]*\} all-gather\(", hlo)}
  kernels = {f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(sharded["params"]) if x.ndim == 2}
  assert kernels == {"f32[64,64]", "f32[64,192]", "f32[192,64]"}
  assert not gathered & kernels, gathered & kernels
  sharding.assert_params_sharded(sharded["params"], min_size=64 * 64)


def test_topk_over_a_sharded_hidden_axis_is_global():
  """Selection is global over the full hidden dimension (the paper's definition) even when that axis is split over
  the tensor devices: the mask of the sharded array equals the single-device mask entry for entry."""
  import qsparse_jax as qs

  x = jax.random.normal(jax.random.key(3), (16, 512))
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 8))
  x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor")))
  mask = jax.jit(lambda v: qs.topk_mask(v, 150))(x_sharded)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(qs.topk_mask(x, 150)))
  # Per-shard selection would keep 150/8 per shard; globally, shards keep different counts.
  per_shard = np.asarray(mask).reshape(16, 8, 64).sum(-1)
  assert np.all(per_shard.sum(-1) == 150) and len(np.unique(per_shard)) > 1
