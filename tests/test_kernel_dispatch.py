"""The model with the Pallas kernels selected (interpret mode here) computes what the plain-JAX path computes: one
semantics on every backend, for both gradient rules, at the ReLU² down projection whose rows have fewer non-zeros
than K (the straight-through rule ignores the mask; the masked one must use the exact top-K mask there)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.nn.linear import SparseLinear
from qsparse_jax.nn.model import ModelConfig, Transformer

BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_seq_len=8)


@pytest.mark.parametrize("gradient", ["ste", "masked"])
@pytest.mark.parametrize("sparse", [dict(sparsity=0.4), dict(sparsity=0.5, block=(2, 4))],
                         ids=["top-K", "n:m"])
def test_pallas_kernels_match_the_xla_path(sparse, gradient):
  cfg = dataclasses.replace(BASE.with_sparsity(sparse["sparsity"]), block=sparse.get("block"), gradient=gradient)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  results = {}
  for kernels in ("xla", "pallas"):
    model = Transformer(dataclasses.replace(cfg, kernels=kernels), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)  # noqa: E731
    results[kernels] = jax.value_and_grad(loss)(params)
  (loss_x, grads_x), (loss_p, grads_p) = results["xla"], results["pallas"]
  # Same masks (exact selection in both), float32 sums in another order: a few ulps.
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_kernels_setting_is_named():
  with pytest.raises(ValueError, match="model.kernels must be 'auto', 'xla' or 'pallas', got 'cuda'"):
    ModelConfig(kernels="cuda")


@pytest.mark.parametrize("gradient", ["ste", "masked"])
def test_an_l2_rescaled_n_m_site_is_the_same_on_every_backend(gradient):
  """The n:m kernel has no L2 rescale: such a site goes through the plain-JAX operators under every backend."""
  x = jnp.maximum(jax.random.normal(jax.random.key(1), (2, 8, 64)), 0.0) ** 2  # zero-heavy, as after a ReLU²
  results = {}
  for kernels in ("xla", "pallas"):
    layer = SparseLinear(64, 32, block=(2, 4), l2_rescale=True, gradient=gradient, kernels=kernels,
                         rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    loss = lambda p, v: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(v)))  # noqa: E731
    results[kernels] = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  (loss_x, grads_x), (loss_p, grads_p) = results["xla"], results["pallas"]
  np.testing.assert_allclose(loss_p, loss_x, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  dense = SparseLinear(64, 32, block=(2, 4), gradient=gradient, kernels="xla", rngs=nnx.Rngs(0))
  assert not np.allclose(dense(x), nnx.merge(*nnx.split(SparseLinear(64, 32, block=(2, 4), l2_rescale=True,
                                                                        kernels="pallas", rngs=nnx.Rngs(0))))(x))
