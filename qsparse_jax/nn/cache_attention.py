"""Attention of new tokens over a KV cache that reads only the filled part of the cache (decode steps).

A cache is allocated at a bucketed size S (inference.decode), larger than what a request has filled so far. The
plain path (`causal_attention` over a [B, T, S] visibility mask) reads all S entries of every layer at every step.
`cache_attention` walks the cache in blocks of BLOCK entries with an online softmax (running max, normaliser and
weighted sum, in float32) and stops after the block holding the furthest query position: a loop with a dynamic trip
count, so a step early in a long bucket reads a few blocks. The result equals softmax over the visible entries up to
float rounding (the sums are taken block by block).

Shapes: B batch, T new tokens, S cache entries, N query heads, H kv heads, G = N / H, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from qsparse_jax.nn.attention_kernels import causal_attention

BLOCK = 128  # cache entries per step of the loop: 128 x K x 4 bytes per kv head, one pass through the cache each


def cache_attention(q_btnk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, positions_bt: jax.Array, *,
                    block: int = BLOCK) -> jax.Array:
  """softmax(q kᵀ / sqrt(K)) v over the cache entries at positions <= each query's own (positions_bt [B, T]),
  reading blocks of the cache only up to the one holding max(positions_bt). q: [B, T, N, K]; k, v: [B, S, H, K] in
  q's dtype. Returns [B, T, N, K] in q's dtype.

  A cache of at most one block, or whose size is not a multiple of `block`, takes the plain path."""
  b, t, n, kd = q_btnk.shape
  s, h = k_bshk.shape[1], k_bshk.shape[2]
  if s <= block or s % block:
    visible_bts = jnp.arange(s)[None, None, :] <= positions_bt[:, :, None]
    return causal_attention(q_btnk, k_bshk, v_bshk, visible_bts)
  g = n // h
  q_bhgtk = q_btnk.reshape(b, t, h, g, kd).transpose(0, 2, 3, 1, 4).astype(jnp.float32) * (kd ** -0.5)
  neg = jnp.finfo(jnp.float32).min

  def step(i, carry):
    m_bhgt, l_bhgt, acc_bhgtk = carry
    start = i * block
    k_blk = lax.dynamic_slice_in_dim(k_bshk, start, block, axis=1).astype(jnp.float32)  # [B, block, H, K]
    v_blk = lax.dynamic_slice_in_dim(v_bshk, start, block, axis=1).astype(jnp.float32)
    logits = jnp.einsum("bhgtk,bshk->bhgts", q_bhgtk, k_blk)
    visible_bts = (start + jnp.arange(block))[None, None, :] <= positions_bt[:, :, None]
    logits = jnp.where(visible_bts[:, None, None], logits, neg)
    m_new = jnp.maximum(m_bhgt, jnp.max(logits, axis=-1))
    correction = jnp.exp(m_bhgt - m_new)
    p = jnp.where(visible_bts[:, None, None], jnp.exp(logits - m_new[..., None]), 0.0)
    l_new = l_bhgt * correction + jnp.sum(p, axis=-1)
    acc_new = acc_bhgtk * correction[..., None] + jnp.einsum("bhgts,bshk->bhgtk", p, v_blk)
    return m_new, l_new, acc_new

  blocks = (jnp.max(positions_bt) + block) // block  # through the block holding the furthest position
  init = (jnp.full((b, h, g, t), neg, jnp.float32), jnp.zeros((b, h, g, t), jnp.float32),
          jnp.zeros((b, h, g, t, kd), jnp.float32))
  _, l_bhgt, acc_bhgtk = lax.fori_loop(0, jnp.minimum(blocks, s // block), step, init)
  out_bhgtk = acc_bhgtk / jnp.maximum(l_bhgt, 1e-30)[..., None]
  return out_bhgtk.transpose(0, 3, 1, 2, 4).reshape(b, t, n, kd).astype(q_btnk.dtype)
