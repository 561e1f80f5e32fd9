"""NNX layers against nnx.Linear and NumPy references written here (method.md §1, §3, §4).

Tolerances: float32 matmuls in XLA and NumPy accumulate in different orders; for the sizes here (<= 64 terms of O(1))
that is a few ulps, so rtol=1e-5 / atol=1e-5 is tight yet order-independent. Sparsity masks are compared exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qsparse_jax as qs
from qsparse_jax.nn import Attention, GLUFeedForward, RMSNorm, SparseLinear

TOL = dict(rtol=1e-5, atol=1e-5)


def np_topk(x, sparsity):
  """x ⊙ Topk(|x|) per row (ties to the lower index), K = round((1 − S) D)."""
  x = np.asarray(x, np.float32)
  k = int(round((1 - sparsity) * x.shape[-1]))
  order = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
  mask = np.zeros(x.shape, bool)
  np.put_along_axis(mask, order, True, axis=-1)
  return np.where(mask, x, 0.0)


def test_sparse_linear_at_sparsity_zero_equals_nnx_linear():
  x = jax.random.normal(jax.random.key(0), (2, 5, 24))
  sparse = SparseLinear(24, 16, rngs=nnx.Rngs(0))
  dense = nnx.Linear(24, 16, rngs=nnx.Rngs(0))
  nnx.update(dense, nnx.state(sparse))
  assert isinstance(sparse, nnx.Linear)
  np.testing.assert_array_equal(sparse(x), dense(x))
  grad_s = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(sparse)
  grad_d = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(dense)
  np.testing.assert_array_equal(grad_s["kernel"][...], grad_d["kernel"][...])


def test_sparse_linear_matches_numpy_and_carries_logical_axes():
  layer = SparseLinear(32, 8, sparsity=0.4, kernel_axes=("mlp", "embed"), rngs=nnx.Rngs(1))
  x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
  w, b = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
  np.testing.assert_allclose(layer(jnp.asarray(x)), np_topk(x, 0.4) @ w + b, **TOL)
  assert layer.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
  assert layer.bias.get_metadata()["out_sharding"] == ("embed",)


@pytest.mark.parametrize("gradient", ["ste", "masked"])
def test_sparse_linear_input_gradient(gradient):
  layer = SparseLinear(16, 4, sparsity=0.5, gradient=gradient, use_bias=False, rngs=nnx.Rngs(2))
  x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
  g = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
  _, vjp = jax.vjp(layer, jnp.asarray(x))
  expected = g @ np.asarray(layer.kernel[...]).T
  if gradient == "masked":
    expected = np.where(np_topk(x, 0.5) != 0, expected, 0.0)
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], expected, **TOL)


def test_sparse_linear_int8_ternary_and_block():
  rng = np.random.default_rng(3)
  layer = SparseLinear(32, 8, block=(2, 8), act_bits=8, ternary_weights=True, use_bias=False, rngs=nnx.Rngs(3))
  x = rng.standard_normal((4, 32)).astype(np.float32)
  w = np.asarray(layer.kernel[...])
  alpha = np.float32(np.mean(np.abs(w), dtype=np.float64) + 1e-5)
  w_q = np.clip(np.round(w / alpha), -1, 1) * alpha
  gamma = np.max(np.abs(x), axis=-1, keepdims=True)
  scale = np.float32(127) / (gamma + np.float32(1e-5))
  x_q = np.clip(np.round(x * scale), -128, 127) * (np.float32(1) / scale)
  blocks = np.abs(x).reshape(4, 4, 8)
  keep = np.zeros(blocks.shape, bool)
  np.put_along_axis(keep, np.argsort(-blocks, axis=-1, kind="stable")[..., :2], True, axis=-1)
  expected = np.where(keep.reshape(4, 32), x_q, 0.0) @ w_q
  # α differs from NumPy's in the last float32 bits (summation order): relative 2e-5 on w_q, hence the tolerance.
  np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-4)


def test_glu_feed_forward_matches_numpy():
  rng = np.random.default_rng(4)
  for activation in ("relu2", "silu"):
    ffn = GLUFeedForward(16, 40, activation=activation, in_site=qs.SparsityConfig(0.25),
                         down_site=qs.SparsityConfig(0.6), rngs=nnx.Rngs(4))
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    wg, wu, wd = (np.asarray(p.kernel[...]) for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))
    xs = np_topk(x, 0.25)
    gate = xs @ wg
    act = np.maximum(gate, 0) ** 2 if activation == "relu2" else gate / (1 + np.exp(-gate))
    expected = np_topk(act * (xs @ wu), 0.6) @ wd
    np.testing.assert_allclose(ffn(jnp.asarray(x)), expected, **TOL)


def np_rope(x_btnk, positions_bt, theta):
  k = x_btnk.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, k, 2, dtype=np.float64) / k)
  ang = positions_bt[..., None] * inv
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x_btnk[..., : k // 2], x_btnk[..., k // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_attention_matches_numpy():
  b, t, d, n, h, kd = 2, 6, 32, 4, 2, 8
  attn = Attention(d, n, num_kv_heads=h, head_dim=kd, qkv_site=qs.SparsityConfig(0.5),
                   out_site=qs.SparsityConfig(0.3), qkv_bias=True, rope_theta=500.0, rngs=nnx.Rngs(5))
  rng = np.random.default_rng(5)
  x = rng.standard_normal((b, t, d)).astype(np.float32)
  for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # non-zero biases, so that the test sees them
    proj.bias[...] = jnp.asarray(rng.standard_normal(proj.bias.shape), jnp.float32)
  xs = np_topk(x, 0.5)
  pos = np.broadcast_to(np.arange(t), (b, t))

  def proj(p, heads):
    return (xs @ np.asarray(p.kernel[...]) + np.asarray(p.bias[...])).reshape(b, t, heads, kd)

  q = np_rope(proj(attn.q_proj, n), pos, 500.0)
  k = np_rope(proj(attn.k_proj, h), pos, 500.0)
  v = proj(attn.v_proj, h)
  k, v = np.repeat(k, n // h, axis=2), np.repeat(v, n // h, axis=2)  # query head i uses kv head i // (n/h)
  logits = np.einsum("btnk,bsnk->bnts", q, k) / np.sqrt(kd)
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnk->btnk", probs, v).reshape(b, t, n * kd)
  expected = np_topk(out, 0.3) @ np.asarray(attn.o_proj.kernel[...])
  np.testing.assert_allclose(attn(jnp.asarray(x)), expected, **TOL)


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(6).standard_normal((3, 10)).astype(np.float32)
  norm = RMSNorm(10, eps=1e-5)
  norm.scale[...] = jnp.linspace(0.5, 1.5, 10)
  expected = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, 10)
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, **TOL)


@pytest.mark.parametrize("make, match", [
    (lambda: SparseLinear(8, 4, sparsity=1.5, rngs=nnx.Rngs(0)), r"sparsity must be in \[0, 1\)"),
    (lambda: SparseLinear(12, 4, block=(2, 8), rngs=nnx.Rngs(0)), r"block m=8 must divide in_features=12"),
    (lambda: SparseLinear(8, 4, gradient="sign", rngs=nnx.Rngs(0)), r"gradient must be one of"),
    (lambda: GLUFeedForward(8, 16, activation="gelu", rngs=nnx.Rngs(0)), r"activation must be 'relu2' or 'silu'"),
    (lambda: Attention(8, 3, num_kv_heads=2, head_dim=4, rngs=nnx.Rngs(0)), r"num_heads=3 must be a multiple"),
])
def test_bad_layer_arguments(make, match):
  with pytest.raises(ValueError, match=match):
    make()
