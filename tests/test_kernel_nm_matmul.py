"""nm_matmul (Block Q-Sparse n:m times W): Pallas kernel in interpret mode and the XLA path against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.nm_matmul import nm_matmul
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
