"""ternary_matmul (int8 × packed 1.58-bit weights): Pallas kernel in interpret mode and the XLA path vs NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qsparse_jax as qs
from pallas_kernels.ternary_matmul import BlockSizes, pack_ternary, ternary_matmul, unpack_ternary
from pallas_kernels.ternary_matmul.reference import ternary_matmul_reference


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), q=st.integers(1, 9), n=st.integers(1, 7))
def test_packing_round_trips_and_uses_two_bits(seed, q, n):
  codes = np.random.default_rng(seed).integers(-1, 2, size=(4 * q, n)).astype(np.int8)
  packed = pack_ternary(jnp.asarray(codes))
  assert packed.shape == (q, n) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(unpack_ternary(packed)), codes)
  # Byte [i, j] holds rows i, i + q, i + 2q, i + 3q in its bit pairs, −1 stored as 2.
  stored = np.where(codes < 0, 2, codes).astype(np.int64)
  want = sum(stored[p * q:(p + 1) * q] << (2 * p) for p in range(4))
  np.testing.assert_array_equal(np.asarray(packed), want)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.sampled_from([1, 8, 24]), d=st.sampled_from([32, 512]),
       n=st.sampled_from([128, 200]))
def test_ternary_matmul_matches_numpy(backend, seed, t, d, n):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, n)), jnp.float32)
  codes, act_scale = qs.absmax_quantize(x, 8)
  w_codes, w_scale = qs.absmean_ternary(w)
  y = ternary_matmul(codes, act_scale, pack_ternary(w_codes), w_scale, backend=backend)
  # Integer products summed exactly, then the same float32 scaling: equal to float32 rounding of one multiply.
  acc = np.asarray(codes, np.int64) @ np.asarray(w_codes, np.int64)
  want = acc.astype(np.float32) * (np.float32(w_scale) / np.asarray(act_scale, np.float32))
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ternary_matmul_reference(codes, act_scale, pack_ternary(w_codes),
                                                                 w_scale)), want, rtol=1e-6, atol=1e-6)
  # The same product as the training path's fake quantization (dequantize, then a float32 matmul).
  fake = np.asarray(qs.quantize_activations(x, 8), np.float64) @ np.asarray(qs.ternarize(w), np.float64)
  np.testing.assert_allclose(np.asarray(y), fake, rtol=1e-4, atol=1e-3 * np.abs(fake).max())


def test_leading_axes_and_bad_input():
  rng = np.random.default_rng(0)
  codes, scale = qs.absmax_quantize(jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32), 8)
  packed = pack_ternary(jnp.asarray(rng.integers(-1, 2, size=(64, 128)), jnp.int8))
  y = ternary_matmul(codes, scale, packed, 0.5)
  np.testing.assert_allclose(np.asarray(y[1, 2]), np.asarray(ternary_matmul(codes[1, 2:], scale[1, 2:], packed,
                                                                            0.5))[0], rtol=1e-6)
  with pytest.raises(ValueError, match="expected int8 activation codes and uint8 packed weights"):
    ternary_matmul(codes.astype(jnp.int32), scale, packed, 0.5)
  with pytest.raises(ValueError, match=r"activations \[..., D\] need packed weights \[D/4, N\]"):
    ternary_matmul(codes, scale, packed[:8], 0.5)
  with pytest.raises(ValueError, match=r"act_scale must be \[..., 1\]"):
    ternary_matmul(codes, scale[..., 0], packed, 0.5)
  with pytest.raises(ValueError, match="D a multiple of 4"):
    pack_ternary(jnp.zeros((6, 2), jnp.int8))


def test_kernel_tiles_with_q_not_a_multiple_of_128():
  """D = 4 x 160 (Q = 160, like D = 11008's Q = 2752: whole-Q blocks), N = 256 in two column blocks, T = 40 padded to
  the int8 row tile of 32."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((40, 640)), jnp.float32)
  codes, act_scale = qs.absmax_quantize(x, 8)
  w_codes, w_scale = qs.absmean_ternary(jnp.asarray(rng.standard_normal((640, 256)), jnp.float32))
  bs = BlockSizes(block_t=32, block_n=128, block_q=160)
  y = ternary_matmul(codes, act_scale, pack_ternary(w_codes), w_scale, backend="pallas", block_sizes=bs)
  acc = np.asarray(codes, np.int64) @ np.asarray(w_codes, np.int64)
  want = acc.astype(np.float32) * (np.float32(w_scale) / np.asarray(act_scale, np.float32))
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-6)  # integer sums: exact, then one scaling
  with pytest.raises(ValueError, match=r"block_t must be a positive multiple of 32 \(the sublane tile of the int8"):
    ternary_matmul(codes, act_scale, pack_ternary(w_codes), w_scale, backend="pallas",
                   block_sizes=BlockSizes(block_t=8, block_n=128, block_q=160))
  with pytest.raises(ValueError, match=r"block_q must be a positive multiple of 128 \(the lane tile\), got 32"):
    ternary_matmul(codes, act_scale, pack_ternary(w_codes), w_scale, backend="pallas",
                   block_sizes=BlockSizes(block_t=32, block_n=128, block_q=32))
