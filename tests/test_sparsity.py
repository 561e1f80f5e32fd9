"""Q-Sparse operators against NumPy references written here (method.md §1, §2, §4, §5)."""

import importlib.util

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qsparse_jax as qs

SPARSITIES = (0.0, 0.3, 0.5, 0.9, 0.99)
DTYPES = (jnp.float32, jnp.bfloat16)


# --------------------------------------------------------------------------------------------- NumPy references


def np_topk_mask(x: np.ndarray, k: int) -> np.ndarray:
  """k largest |x| per row along the last axis, ties to the lower index: a stable sort of −|x| in float32."""
  a = np.abs(np.asarray(x, np.float32))
  order = np.argsort(-a, axis=-1, kind="stable")[..., :k]
  mask = np.zeros(a.shape, bool)
  np.put_along_axis(mask, order, True, axis=-1)
  return mask


def np_block_mask(x: np.ndarray, n: int, m: int) -> np.ndarray:
  blocks = np.asarray(x, np.float32).reshape(*x.shape[:-1], x.shape[-1] // m, m)
  return np_topk_mask(blocks, n).reshape(x.shape)


def np_absmax_quant(x: np.ndarray, bits: int = 8, eps: float = 1e-5):
  """method.md §4: Q(X) = RoundClip(Qp / (γ + ε) · X, −Qp − 1, Qp), γ = max|X| per token, float32 arithmetic."""
  x = np.asarray(x, np.float32)
  qp = np.float32(2 ** (bits - 1) - 1)
  gamma = np.max(np.abs(x), axis=-1, keepdims=True)
  scale = qp / (gamma + np.float32(eps))
  q = np.clip(np.round(x * scale), -qp - 1, qp)  # np.round: half to even, as jnp.round
  return q, scale


def keep(dim, sparsity):
  return int(round((1 - sparsity) * dim))


# ------------------------------------------------------------------------------------------------- strategies


@st.composite
def activations(draw, min_dim=1, max_dim=96, ties=None):
  lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
  dim = draw(st.integers(min_dim, max_dim))
  dtype = draw(st.sampled_from(DTYPES))
  if ties is None:
    ties = draw(st.booleans())
  shape = (*lead, dim)
  if ties:  # few distinct magnitudes, both signs: many exact ties at the threshold
    x = draw(hnp.arrays(np.int8, shape, elements=st.integers(-3, 3))).astype(np.float32)
  else:
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(scale)
  return jnp.asarray(x, dtype)


# ---------------------------------------------------------------------------------------------------- top-K


@settings(max_examples=10, deadline=None)
@given(x=activations(), sparsity=st.sampled_from(SPARSITIES))
def test_topk_mask_matches_numpy(x, sparsity):
  k = keep(x.shape[-1], sparsity)
  mask = np.asarray(qs.topk_mask(x, k))
  assert mask.dtype == bool and mask.shape == x.shape
  np.testing.assert_array_equal(mask.sum(-1), k)  # exactly k per row
  np.testing.assert_array_equal(mask, np_topk_mask(np.asarray(x.astype(jnp.float32)), k))


@settings(max_examples=6, deadline=None)
@given(x=activations(min_dim=8, max_dim=200), sparsity=st.sampled_from(SPARSITIES[1:]))
def test_topk_mask_matches_lax_top_k(x, sparsity):
  """The fast threshold search selects what jax.lax.top_k (lower index first on ties) selects."""
  k = keep(x.shape[-1], sparsity)
  _, idx = jax.lax.top_k(jnp.abs(x.astype(jnp.float32)), k)
  ref = np.zeros(x.shape, bool)
  np.put_along_axis(ref, np.asarray(idx), True, axis=-1)
  np.testing.assert_array_equal(np.asarray(qs.topk_mask(x, k)), ref)


def test_topk_mask_extreme_magnitudes():
  """Subnormals, zeros, infinities and the largest finite values order exactly (bit patterns, not flushed floats)."""
  tiny = np.float32(1e-45)
  row = np.array([0.0, tiny, -2 * tiny, 3e-39, -np.inf, 3.4e38, -3.4e38, 1.0, -0.0, 5 * tiny], np.float32)
  x = jnp.asarray(np.stack([row, row[::-1], -row]))
  for k in range(row.size + 1):
    np.testing.assert_array_equal(np.asarray(qs.topk_mask(x, k)), np_topk_mask(np.asarray(x), k), err_msg=f"k={k}")


def test_topk_mask_large_rows_many_blocks():
  """Rows spread over several cache blocks, with padding of the last one, and heavy ties after a ReLU²."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((300, 1024)).astype(np.float32)
  x = np.where(rng.random(x.shape) < 0.6, 0.0, x * x)
  for k in (1, 300, 717, 1023):
    np.testing.assert_array_equal(np.asarray(qs.topk_mask(jnp.asarray(x), k)), np_topk_mask(x, k))


@settings(max_examples=7, deadline=None)
@given(x=activations(), sparsity=st.sampled_from(SPARSITIES), gradient=st.sampled_from(qs.GRADIENT_MODES),
       seed=st.integers(0, 2**16))
def test_topk_sparsify_forward_and_vjp(x, sparsity, gradient, seed):
  xf = np.asarray(x.astype(jnp.float32))
  k = keep(x.shape[-1], sparsity)
  mask = np_topk_mask(xf, k)
  y, vjp = jax.vjp(lambda v: qs.topk_sparsify(v, sparsity, gradient=gradient), x)
  assert y.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.where(mask, xf, 0.0))
  cot = jnp.asarray(np.random.default_rng(seed).standard_normal(x.shape), x.dtype)
  (grad,) = vjp(cot)
  expected = np.asarray(cot.astype(jnp.float32))
  if gradient == "masked":
    expected = np.where(mask, expected, 0.0)
  np.testing.assert_array_equal(np.asarray(grad.astype(jnp.float32)), expected)


def test_sparsity_zero_is_identity():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 7)), jnp.float32)
  assert qs.topk_sparsify(x, 0.0) is x
  (g,) = jax.vjp(lambda v: qs.topk_sparsify(v, 0.0, gradient="masked"), x)[1](jnp.ones_like(x))
  np.testing.assert_array_equal(g, np.ones(x.shape))


def test_l2_rescale_keeps_token_norm():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 5, 64)).astype(np.float32)
  mask = np_topk_mask(x, keep(64, 0.5))
  sparse = np.where(mask, x, 0.0)
  scale = np.linalg.norm(x, axis=-1, keepdims=True) / np.linalg.norm(sparse, axis=-1, keepdims=True)
  y, vjp = jax.vjp(lambda v: qs.topk_sparsify(v, 0.5, l2_rescale=True), jnp.asarray(x))
  np.testing.assert_allclose(y, sparse * scale, rtol=2e-6, atol=0)  # a few float32 ulps through two norms
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=2e-6)
  cot = rng.standard_normal(x.shape).astype(np.float32)
  np.testing.assert_allclose(vjp(jnp.asarray(cot))[0], cot * scale, rtol=2e-6)


def test_jit_and_vmap_agree_with_eager():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 5, 40)), jnp.float32)
  eager = qs.topk_sparsify(x, 0.5)
  np.testing.assert_array_equal(jax.jit(lambda v: qs.topk_sparsify(v, 0.5))(x), eager)
  np.testing.assert_array_equal(jax.vmap(lambda v: qs.topk_sparsify(v, 0.5))(x), eager)
  np.testing.assert_array_equal(jax.vmap(jax.vmap(lambda v: qs.topk_mask(v, 20)))(x), np_topk_mask(np.asarray(x), 20))
  np.testing.assert_array_equal(jax.vmap(lambda v: qs.block_topk_sparsify(v, 2, 8))(x), qs.block_topk_sparsify(x, 2, 8))


# ----------------------------------------------------------------------------------------------- Block Q-Sparse


@settings(max_examples=7, deadline=None)
@given(data=st.data(), gradient=st.sampled_from(qs.GRADIENT_MODES))
def test_block_topk_sparsify(data, gradient):
  m = data.draw(st.sampled_from([1, 2, 4, 8, 32]))
  n = data.draw(st.integers(1, m))
  blocks = data.draw(st.integers(1, 4))
  lead = tuple(data.draw(st.lists(st.integers(1, 4), max_size=2)))
  dtype = data.draw(st.sampled_from(DTYPES))
  seed = data.draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  values = rng.integers(-3, 4, (*lead, blocks * m)).astype(np.float32) if data.draw(st.booleans()) else \
      rng.standard_normal((*lead, blocks * m)).astype(np.float32)
  x = jnp.asarray(values, dtype)
  xf = np.asarray(x.astype(jnp.float32))
  mask = np_block_mask(xf, n, m)
  y, vjp = jax.vjp(lambda v: qs.block_topk_sparsify(v, n, m, gradient=gradient), x)
  np.testing.assert_array_equal(mask.reshape(*lead, blocks, m).sum(-1), n)
  np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.where(mask, xf, 0.0))
  cot = jnp.asarray(rng.standard_normal(x.shape), dtype)
  expected = np.asarray(cot.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(vjp(cot)[0].astype(jnp.float32)),
                                np.where(mask, expected, 0.0) if gradient == "masked" else expected)


# --------------------------------------------------------------------------------------------------- quantizers


@settings(max_examples=7, deadline=None)
@given(x=activations(ties=False), bits=st.sampled_from([8, 4, 2]))
def test_absmax_quantization_bit_exact(x, bits):
  xf = np.asarray(x.astype(jnp.float32))
  q_ref, scale_ref = np_absmax_quant(xf, bits)
  q, scale = qs.absmax_quantize(x, bits)
  assert q.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(scale), scale_ref)
  np.testing.assert_array_equal(np.asarray(q), q_ref)
  y, vjp = jax.vjp(lambda v: qs.quantize_activations(v, bits), x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.asarray(q_ref * (np.float32(1) / scale_ref), x.dtype)))
  cot = jnp.ones_like(x) * 3
  np.testing.assert_array_equal(vjp(cot)[0], cot)  # straight through


@settings(max_examples=10, deadline=None)
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=33), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(DTYPES))
def test_ternary_quantization_bit_exact(shape, seed, dtype):
  w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 0.02, dtype)
  wf = np.asarray(w.astype(jnp.float32))
  q, scale = qs.absmean_ternary(w)
  # α = mean|W| is a float32 sum of n <= 33³ terms in XLA's order: its rounding error is about √n · 2⁻²⁴ <= 1.1e-5
  # relative to an exact (float64) mean. q and the dequantized weights are then checked bit for bit against that α.
  np.testing.assert_allclose(float(scale), np.mean(np.abs(wf), dtype=np.float64) + 1e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(q), np.clip(np.round(wf / np.float32(scale)), -1, 1))
  assert set(np.unique(np.asarray(q))) <= {-1, 0, 1}
  y, vjp = jax.vjp(qs.ternarize, w)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.asarray(np.asarray(q, np.float32) * np.float32(scale),
                                                                       dtype)))
  np.testing.assert_array_equal(vjp(jnp.ones_like(w))[0], np.ones(shape))


def test_combined_path_masks_before_quantization():
  """Y = Q(X) ⊙ M with M from |X| (method.md §4); STE through both."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((6, 48)).astype(np.float32)
  cfg = qs.SparsityConfig(sparsity=0.5, act_bits=8, gradient="masked")
  mask = np_topk_mask(x, 24)
  q, scale = np_absmax_quant(x)
  y, vjp = jax.vjp(lambda v: qs.sparsify(v, cfg), jnp.asarray(x))
  np.testing.assert_array_equal(y, np.where(mask, q * (np.float32(1) / scale), 0.0))
  cot = rng.standard_normal(x.shape).astype(np.float32)
  np.testing.assert_array_equal(vjp(jnp.asarray(cot))[0], np.where(mask, cot, 0.0))


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, match", [
    (lambda x: qs.topk_sparsify(x, 1.0), r"sparsity must be in \[0, 1\)"),
    (lambda x: qs.topk_sparsify(x, -0.1), r"sparsity must be in \[0, 1\)"),
    (lambda x: qs.topk_sparsify(x, 0.5, gradient="none"), r"gradient must be one of"),
    (lambda x: qs.topk_mask(x, 17), r"k must be an integer in \[0, D=16\]"),
    (lambda x: qs.topk_mask(x, -1), r"k must be an integer in \[0, D=16\]"),
    (lambda x: qs.block_topk_sparsify(x, 5, 4), r"n \(survivors per block\) must be an integer in \[1, m=4\]"),
    (lambda x: qs.block_topk_sparsify(x, 2, 5), r"m=5 must divide the last axis D=16"),
    (lambda x: qs.topk_sparsify(x.astype(jnp.int32), 0.5), r"x must be a floating-point array"),
    (lambda x: qs.topk_mask(jnp.arange(16), 3), r"x must be a floating-point array"),
    (lambda x: qs.quantize_activations(x, 9), r"bits must be an integer in \[2, 8\]"),
    (lambda x: qs.SparsityConfig(act_bits=1), r"act_bits must be an integer in \[2, 8\]"),
])
def test_bad_input_names_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((2, 16), jnp.float32))


def test_installs_without_tensorflow():
  import tensorflow_datasets  # noqa: F401  (the data layer's dependency imports on its own)
  assert importlib.util.find_spec("tensorflow") is None


@settings(max_examples=6, deadline=None)
@given(x=activations(ties=True), sparsity=st.sampled_from(SPARSITIES[1:]))
def test_inexact_zero_ties_keep_the_same_values(x, sparsity):
  """exact_zero_ties=False may keep extra zeros (rows with fewer than k non-zeros), never anything else."""
  x = jnp.maximum(x, 0)  # a ReLU: many rows have fewer than k non-zeros
  k = keep(x.shape[-1], sparsity)
  ref = np_topk_mask(np.asarray(x.astype(jnp.float32)), k)
  mask = np.asarray(qs.topk_mask(x, k, exact_zero_ties=False))
  xf = np.asarray(x.astype(jnp.float32))
  np.testing.assert_array_equal(np.where(mask, xf, 0.0), np.where(ref, xf, 0.0))
  assert np.all(mask >= ref) and np.all(xf[mask & ~ref] == 0)


def test_relu_method_is_relu_with_its_own_gradient():
  """The ablation's sparsifier (method.md §2): ReLU(x) forward, the ReLU derivative backward (NumPy reference)."""
  x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
  g = np.random.default_rng(4).standard_normal((4, 16)).astype(np.float32)
  cfg = qs.SparsityConfig(method="relu")
  y, vjp = jax.vjp(lambda v: qs.sparsify(v, cfg), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.maximum(x, 0))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), np.where(x > 0, g, 0))
  with pytest.raises(ValueError, match="method 'relu' sparsifies by ReLU alone: leave sparsity at 0"):
    qs.SparsityConfig(method="relu", sparsity=0.5)
