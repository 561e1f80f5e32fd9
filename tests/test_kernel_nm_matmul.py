"""nm_matmul (Block Q-Sparse n:m times W): Pallas kernel in interpret mode and the XLA path against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.nm_matmul import BlockSizes, nm_matmul
from pallas_kernels.nm_matmul.reference import nm_matmul_reference

# float32 accumulation everywhere; tiles sum in another order than NumPy's float64 (a few ulps of the row norm).
# bfloat16 inputs are exact in float32; only the final cast rounds (2^-8 relative).
TOLERANCE = {jnp.float32: dict(rtol=2e-5, atol=1e-4), jnp.bfloat16: dict(rtol=1e-2, atol=5e-2)}


def np_nm_mask(x, n, m):
  a = np.abs(np.asarray(x, np.float32)).reshape(x.shape[0], -1, m)
  keep = np.argsort(-a, axis=-1, kind="stable")[..., :n]  # ties to the lower index
  mask = np.zeros(a.shape, bool)
  np.put_along_axis(mask, keep, True, axis=-1)
  return mask.reshape(x.shape)


def problem(seed, t, d, out, dtype, ties):
  rng = np.random.default_rng(seed)
  x = rng.choice([-1.0, 0.0, 1.0, 2.0], size=(t, d)) if ties else rng.standard_normal((t, d))
  return jnp.asarray(x, dtype), jnp.asarray(rng.standard_normal((d, out)), dtype)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.sampled_from([8, 24]), d=st.sampled_from([32, 256]),
       out=st.sampled_from([128, 96]), nm=st.sampled_from([(16, 32), (2, 4), (1, 8), (8, 8)]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), ties=st.booleans())
def test_nm_matmul_matches_numpy(backend, seed, t, d, out, nm, dtype, ties):
  n, m = nm
  x, w = problem(seed, t, d, out, dtype, ties)
  y = nm_matmul(x, w, n, m, backend=backend)
  x32, w32 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  want = np.where(np_nm_mask(x, n, m), x32, 0) @ w32
  assert y.shape == (t, out) and y.dtype == dtype
  np.testing.assert_allclose(np.asarray(y, np.float32), want, **TOLERANCE[dtype])
  np.testing.assert_allclose(np.asarray(nm_matmul_reference(x, w, n, m)), want, **TOLERANCE[jnp.float32])


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_vjp_with_random_cotangents(backend):
  x, w = problem(1, 16, 64, 128, jnp.float32, ties=False)
  x3 = x.reshape(2, 8, 64)  # leading axes are flattened and restored
  g = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 128)), jnp.float32)
  y, vjp = jax.vjp(lambda a, b: nm_matmul(a, b, 2, 4, backend=backend), x3, w)
  dx, dw = vjp(g)
  g2 = np.asarray(g, np.float64).reshape(16, 128)
  masked = np.where(np_nm_mask(x, 2, 4), np.asarray(x, np.float64), 0)
  # Straight-through for the mask (method.md Eq. 5): dx = g Wᵀ; the weight sees only the kept activations.
  np.testing.assert_allclose(np.asarray(dx).reshape(16, 64), g2 @ np.asarray(w, np.float64).T, rtol=2e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dw), masked.T @ g2, rtol=2e-5, atol=1e-4)


def test_bad_input_is_named():
  x, w = problem(0, 8, 32, 128, jnp.float32, ties=False)
  with pytest.raises(ValueError, match=r"expected x \[..., D\] and W \[D, N\] with the same D"):
    nm_matmul(x, w[:16], 2, 4)
  with pytest.raises(ValueError, match="m dividing D=32, got 2:3"):
    nm_matmul(x, w, 2, 3)
  with pytest.raises(ValueError, match="0 < n <= m"):
    nm_matmul(x, w, 5, 4)


def zero_heavy(seed, t, d, dtype):
  """ReLU(z)² rows: about half the entries are exactly 0, so many 2:4 groups keep a zero (ties at zero)."""
  z = np.random.default_rng(seed).standard_normal((t, d))
  return jnp.asarray(np.maximum(z, 0) ** 2, dtype)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("gradient", ["ste", "masked"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_modes_on_zero_heavy_input(backend, gradient, dtype):
  """One semantics on every backend: dW = (x ⊙ M)ᵀ g, and dx = g Wᵀ (ste) or (g Wᵀ) ⊙ M (masked) with the exact
  n:m mask, which keeps zeros where a group has fewer than n non-zeros (a y != 0 mask would not)."""
  x = zero_heavy(3, 16, 128, dtype)
  w = jnp.asarray(np.random.default_rng(4).standard_normal((128, 256)), dtype)
  g = jnp.asarray(np.random.default_rng(5).standard_normal((16, 256)), dtype)
  y, vjp = jax.vjp(lambda a, b: nm_matmul(a, b, 2, 4, gradient=gradient, backend=backend), x, w)
  dx, dw = vjp(g)
  mask = np_nm_mask(x, 2, 4)
  assert np.any(mask & (np.asarray(x, np.float32) == 0))  # kept zeros: the case where the two masks differ
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
  want_dx = g64 @ w64.T
  if gradient == "masked":
    want_dx = np.where(mask, want_dx, 0)
  # bfloat16 operands, float32 accumulation: only the final casts round (2^-8 relative of each result).
  tol = dict(rtol=2e-5, atol=1e-4) if dtype == jnp.float32 else dict(rtol=1e-2, atol=0.1)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.where(mask, x64, 0) @ w64, **tol)
  np.testing.assert_allclose(np.asarray(dx, np.float32), want_dx, **tol)
  np.testing.assert_allclose(np.asarray(dw, np.float32), np.where(mask, x64, 0).T @ g64, **tol)
  if gradient == "masked":  # exactly zero off the mask
    np.testing.assert_array_equal(np.asarray(dx, np.float32)[~mask], 0)


@pytest.mark.parametrize("nm", [(2, 4), (8, 16), (16, 32)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_many_tiles_reuse_the_masked_rows(nm, dtype):
  """A grid of 3 row blocks x 3 column blocks x 2 depth blocks: the masked x tile made at the first column block
  is read from VMEM by the later ones, and T = 40 is padded to the row block."""
  n, m = nm
  x, w = problem(9, 40, 256, 384, dtype, ties=True)
  bs = BlockSizes(block_t=16, block_n=128, block_d=128)
  vjp_fn = jax.vjp(lambda a, b: nm_matmul(a, b, n, m, gradient="masked", backend="pallas", block_sizes=bs), x, w)[1]
  y = nm_matmul(x, w, n, m, backend="pallas", block_sizes=bs)
  mask = np_nm_mask(x, n, m)
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.where(mask, x64, 0) @ w64, **TOLERANCE[dtype])
  g = jnp.ones((40, 384), dtype)
  dx, dw = vjp_fn(g)
  np.testing.assert_allclose(np.asarray(dx, np.float32), np.where(mask, np.ones((40, 384)) @ w64.T, 0),
                             **TOLERANCE[dtype])
  np.testing.assert_allclose(np.asarray(dw, np.float32), np.where(mask, x64, 0).T @ np.ones((40, 384)),
                             **TOLERANCE[dtype])


def test_block_sizes_are_validated_against_the_tiling():
  x, w = problem(0, 32, 256, 256, jnp.bfloat16, ties=False)
  with pytest.raises(ValueError, match=r"block_t must be a positive multiple of 16 \(the sublane tile of bfloat16\)"):
    nm_matmul(x, w, 2, 4, backend="pallas", block_sizes=BlockSizes(8, 128, 128))
  with pytest.raises(ValueError, match=r"block_n must be a positive multiple of 128 \(the lane tile\), got 64"):
    nm_matmul(x, w, 2, 4, backend="pallas", block_sizes=BlockSizes(16, 64, 128))
  with pytest.raises(ValueError, match="block_d=384 must divide D=256"):
    nm_matmul(x, w, 2, 4, backend="pallas", block_sizes=BlockSizes(16, 128, 384))
  assert BlockSizes.get_default(jnp.float32, 2048, 4096, 11008, 32, chip="v5p") == BlockSizes(128, 256, 512, None)
  small = BlockSizes.get_default(jnp.bfloat16, 1, 11008, 4096, 4, chip="v6e")
  assert (small.block_t, small.block_n, small.block_d) == (16, 512, 256)  # decode: one bf16 tile of rows
