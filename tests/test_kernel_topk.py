"""The top-K kernel (Pallas, interpret mode on CPU) and its XLA path against NumPy written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qsparse_jax as qs
from pallas_kernels.topk import BlockSizes, topk_sparsify, topk_sparsify_int8
from pallas_kernels.topk.reference import topk_sparsify_int8_reference, topk_sparsify_reference
from qsparse_jax.ops.selection import keeps, kth_thresholds, magnitude_key, zero_key_bits

BACKENDS = ("xla", "pallas")


def np_topk_sparsify(x, k):
  """Keep the k largest |x| per row (stable sort: ties to the lower index), zero the rest."""
  a = np.abs(np.asarray(x, np.float32))
  keep = np.argsort(-a, axis=-1, kind="stable")[..., :k]
  mask = np.zeros(a.shape, bool)
  np.put_along_axis(mask, keep, True, axis=-1)
  return np.where(mask, np.asarray(x), 0), mask


def np_int8(x, k):
  x32 = np.asarray(x, np.float32)
  scale = np.float32(127.0) / (np.max(np.abs(x32), axis=-1, keepdims=True) + np.float32(1e-5))
  codes = np.clip(np.round(x32 * scale), -128, 127).astype(np.int8)
  return np.where(np_topk_sparsify(x, k)[1], codes, 0), scale


def draw(seed, shape, dtype, ties):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  if ties:  # few distinct magnitudes of both signs: many ties at the K-th value
    x = rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0], size=shape)
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.sampled_from([1, 9, 16]), d=st.sampled_from([7, 128, 300]),
       keep=st.sampled_from([0.0, 0.3, 0.6, 1.0]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       ties=st.booleans())
def test_topk_sparsify_matches_numpy(backend, seed, rows, d, keep, dtype, ties):
  k = max(1, round(keep * d))
  x = draw(seed, (rows, d), dtype, ties)
  y = topk_sparsify(x, k, backend=backend)
  want, _ = np_topk_sparsify(x, k)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))  # selection is exact
  np.testing.assert_array_equal(np.asarray(topk_sparsify_reference(x, k), np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_fused_quantization(backend):
  x = draw(3, (2, 3, 96), jnp.float32, ties=False)  # leading axes are flattened and restored
  for k in (1, 40, 96):
    codes, scale = topk_sparsify_int8(x, k, backend=backend)
    want_codes, want_scale = np_int8(x, k)
    assert codes.dtype == jnp.int8 and codes.shape == x.shape and scale.shape == (2, 3, 1)
    np.testing.assert_array_equal(np.asarray(codes), want_codes)
    np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-7)  # the same float32 formula
    ref_codes, _ = topk_sparsify_int8_reference(x, k)
    np.testing.assert_array_equal(np.asarray(ref_codes), want_codes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gradient", ["ste", "masked"])
def test_vjp_with_random_cotangents(backend, gradient):
  x = draw(5, (8, 64), jnp.float32, ties=False)
  g = jnp.asarray(np.random.default_rng(6).standard_normal((8, 64)), jnp.float32)
  y, vjp = jax.vjp(lambda v: topk_sparsify(v, 20, gradient=gradient, backend=backend), x)
  (dx,) = vjp(g)
  _, mask = np_topk_sparsify(x, 20)
  want = np.asarray(g) if gradient == "ste" else np.where(mask, np.asarray(g), 0)  # method.md Eq. 5 / the ablation
  np.testing.assert_array_equal(np.asarray(dx), want)


def test_rows_without_a_nonzero_and_edge_values():
  x = jnp.zeros((3, 32), jnp.float32).at[1].set(-0.0).at[2, 5].set(jnp.inf).at[2, 6].set(1e-40)  # inf, subnormal
  for backend in BACKENDS:
    y = topk_sparsify(x, 2, backend=backend)
    np.testing.assert_array_equal(np.asarray(y), np_topk_sparsify(x, 2)[0])


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r"k must be in \[1, D=8\], got 9"):
    topk_sparsify(jnp.ones((2, 8)), 9)
  with pytest.raises(ValueError, match="x must be a floating array"):
    topk_sparsify(jnp.ones((2, 8), jnp.int32), 3)
  with pytest.raises(ValueError, match="gradient must be 'ste' or 'masked'"):
    topk_sparsify(jnp.ones((2, 8)), 3, gradient="relu")


def relu2_rows(seed, rows, d, dtype):
  """ReLU(z)² rows as at a ReLU² down projection: about half of every row is exactly 0."""
  z = np.random.default_rng(seed).standard_normal((rows, d))
  return jnp.asarray(np.maximum(z, 0) ** 2, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gradient", ["ste", "masked"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_agree_on_rows_with_fewer_than_k_nonzeros(backend, gradient, dtype):
  """K above the non-zeros of a row: the mask also keeps its first zeros (ties to the lower index). The masked
  gradient must use that exact mask on every backend, and agree with the library's qsparse_jax.topk_sparsify."""
  x = relu2_rows(7, 16, 256, dtype)
  k = 180  # about 128 non-zeros per row
  assert int(np.max(np.sum(np.asarray(x, np.float32) != 0, axis=1))) < k
  g = jnp.asarray(np.random.default_rng(8).standard_normal((16, 256)), dtype)
  y, vjp = jax.vjp(lambda v: topk_sparsify(v, k, gradient=gradient, backend=backend), x)
  (dx,) = vjp(g)
  want_y, mask = np_topk_sparsify(x, k)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))
  want = np.asarray(g, np.float32) if gradient == "ste" else np.where(mask, np.asarray(g, np.float32), 0)
  np.testing.assert_array_equal(np.asarray(dx, np.float32), want)
  # A y != 0 mask would drop the kept zeros' cotangents: make sure this input tells the two apart.
  assert gradient == "ste" or np.any(mask & (np.asarray(x) == 0))
  library = jax.vjp(lambda v: qs.topk_sparsify(v, 1 - k / 256, gradient=gradient), x)[1](g)[0]
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(library, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_search_and_library_search_select_the_same_entries(dtype):
  """selection.kth_thresholds (the kernel's fixed-step search) and row_thresholds (the XLA path's, with early
  stops) give thresholds whose masks (selection.keeps) are the stable-sort top-K, ties and zeros included."""
  rng = np.random.default_rng(11)
  x = np.concatenate([rng.standard_normal((6, 200)), rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0], (6, 200)),
                      np.asarray(relu2_rows(3, 6, 200, jnp.float32))])
  x = jnp.asarray(x, dtype)
  key = magnitude_key(x)
  pos = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)
  search = jax.jit(lambda key, k: keeps(key, pos, *kth_thresholds(key, k, zero_bits=zero_key_bits(dtype))),
                   static_argnums=1)
  for k in (1, 37, 120, 199):
    _, want = np_topk_sparsify(x, k)
    np.testing.assert_array_equal(np.asarray(search(key, k)), want)
    np.testing.assert_array_equal(np.asarray(qs.topk_mask(x, k)), want)


def test_block_sizes_follow_the_dtype_tiling():
  x = draw(0, (40, 256), jnp.float32, ties=True)
  y = topk_sparsify(x, 90, backend="pallas", block_sizes=BlockSizes(16))  # 40 rows: 3 steps, 8 rows of padding
  np.testing.assert_array_equal(np.asarray(y), np_topk_sparsify(x, 90)[0])
  with pytest.raises(ValueError, match=r"block_rows must be a positive multiple of 16 \(the sublane tile of bfloat16"):
    topk_sparsify(x.astype(jnp.bfloat16), 90, backend="pallas", block_sizes=BlockSizes(8))
  with pytest.raises(ValueError, match=r"block_rows must be a positive multiple of 32 \(the sublane tile of "
                                       r"float32 and int8"):
    topk_sparsify_int8(x, 90, backend="pallas", block_sizes=BlockSizes(16))
  with pytest.raises(ValueError, match="block_rows must be a positive multiple of 1"):
    BlockSizes(0)
  assert BlockSizes.get_default(jnp.bfloat16, 4096).block_rows == 16
  assert BlockSizes.get_default(jnp.float32, 4096, int8=True).block_rows == 32
  assert BlockSizes.get_default(jnp.float32, 4096, chip="v6e").block_rows == 32
