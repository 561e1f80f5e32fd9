"""Attention over a KV cache that reads only its filled blocks, against NumPy softmax over the visible entries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse_jax.nn.cache_attention import cache_attention


def numpy_attention(q, k, v, positions):
  """float64 softmax(q kᵀ / sqrt(K)) v over the entries at positions <= each query's, grouped-query heads."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, kd = q.shape
  h = k.shape[2]
  out = np.zeros((b, t, n, kd))
  for r in range(b):
    for i in range(t):
      for head in range(n):
        seen = int(positions[r, i]) + 1
        logits = k[r, :seen, head // (n // h)] @ q[r, i, head] / np.sqrt(kd)
        p = np.exp(logits - logits.max())
        out[r, i, head] = (p / p.sum()) @ v[r, :seen, head // (n // h)]
  return out


@pytest.mark.parametrize("t", [1, 3])
def test_blockwise_cache_attention_equals_softmax_over_visible_entries(t):
  b, s, n, h, kd = 3, 512, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, n, kd))
  k = jax.random.normal(keys[1], (b, s, h, kd))
  v = jax.random.normal(keys[2], (b, s, h, kd))
  positions = np.array([[5], [130], [300]]) + np.arange(t)[None]  # rows in blocks 0, 1 and 2 of 128
  got = cache_attention(q, k, v, jnp.asarray(positions, jnp.int32))
  # float32 exponentials and sums, block by block: relative 1e-5 of O(1) outputs
  np.testing.assert_allclose(got, numpy_attention(q, k, v, positions), rtol=1e-5, atol=1e-5)


def test_blocks_past_the_furthest_position_are_not_read():
  """NaNs in every block after the one holding the furthest query position leave the output finite and equal."""
  b, s, n, kd = 2, 1024, 2, 8
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (b, 1, n, kd))
  k = jax.random.normal(keys[1], (b, s, n, kd))
  v = jax.random.normal(keys[2], (b, s, n, kd))
  positions = jnp.asarray([[40], [200]], jnp.int32)  # the furthest, 200, is in block 1 of 128
  clean = jax.jit(cache_attention)(q, k, v, positions)
  poisoned = jax.jit(cache_attention)(q, k.at[:, 256:].set(jnp.nan), v.at[:, 256:].set(jnp.nan), positions)
  assert np.isfinite(np.asarray(poisoned)).all()
  np.testing.assert_array_equal(poisoned, clean)
  np.testing.assert_allclose(clean, numpy_attention(q, k, v, np.asarray(positions)), rtol=1e-5, atol=1e-5)
