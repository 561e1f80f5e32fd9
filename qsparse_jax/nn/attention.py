"""Causal grouped-query attention with RoPE and two Q-Sparse sites: the shared q/k/v input and the output-projection
input (method.md §1). QKᵀ and softmax·V stay dense.

Shapes: B batch, T query time, S key time, D model, N query heads, G query heads per kv head, H kv heads, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qsparse_jax.nn.attention_kernels import attention
from qsparse_jax.nn.cache_attention import cache_attention
from qsparse_jax.nn.linear import DENSE, SparseLinear, decode_site, project, site_kwargs
from qsparse_jax.nn.rope import RopeScaling, apply_rope, rope_frequencies
from qsparse_jax.ops import SparsityConfig
from qsparse_jax.parallel.sharding import constrain


class Attention(nnx.Module):
  """Causal multi-head (optionally grouped-query) attention with RoPE and two Q-Sparse sites (method.md §1).

  q_proj, k_proj and v_proj carry `qkv_site`: the input x is sparsified once for the three (linear.project) and each
  multiplies with the site's full treatment (n:m kernel, packed int8 x ternary, kept-entries decode). The attention
  output is sparsified by `out_site` inside the output projection. qkv_bias adds biases to q/k/v (Qwen2).

  QKᵀ and softmax·V run through attention_kernels.attention, chosen by the platform compiled for (splash attention
  on TPU, cuDNN on GPU, XLA elsewhere): causal by index within each row, and within each segment when segment ids
  are given; positions_bt only rotates q and k, so they must rise by one along each segment (arange, or restarting
  at each packed conversation as data.instructions makes them).

  __call__(x_btd, positions_bt, segment_ids_bt=None) -> [B, T, D].
  """

  def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None, head_dim: int | None = None,
               qkv_site: SparsityConfig = DENSE, out_site: SparsityConfig = DENSE, qkv_bias: bool = False,
               rope_theta: float = 10000.0, rope_scaling: RopeScaling | None = None, ternary_weights: bool = False,
               kernels: str = "auto", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    num_kv_heads = num_kv_heads or num_heads
    head_dim = head_dim or d_model // num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    common = dict(ternary_weights=ternary_weights, kernels=kernels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.kernels = kernels
    qkv = dict(use_bias=qkv_bias, **site_kwargs(qkv_site), **common)
    self.q_proj = SparseLinear(d_model, num_heads * head_dim, kernel_axes=("embed", "heads"), **qkv)
    self.k_proj = SparseLinear(d_model, num_kv_heads * head_dim, kernel_axes=("embed", "kv_heads"), **qkv)
    self.v_proj = SparseLinear(d_model, num_kv_heads * head_dim, kernel_axes=("embed", "kv_heads"), **qkv)
    self.o_proj = SparseLinear(num_heads * head_dim, d_model, use_bias=False, kernel_axes=("heads", "embed"),
                               **site_kwargs(out_site), **common)
    self.qkv_site = qkv_site
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta
    self.rope_scaling = rope_scaling

  def project_qkv(self, x_btd: jax.Array, positions_bt: jax.Array):
    """Sparsify x once (the q/k/v site, linear.project) and return RoPE'd q [B,T,N,K], k [B,T,H,K] and v [B,T,H,K]."""
    b, t, _ = x_btd.shape
    q, k, v = project(x_btd, self.q_proj, self.k_proj, self.v_proj)
    q = constrain(q.reshape(b, t, self.num_heads, self.head_dim), ("batch", None, "heads", None))
    k = constrain(k.reshape(b, t, self.num_kv_heads, self.head_dim), ("batch", None, "kv_heads", None))
    v = constrain(v.reshape(b, t, self.num_kv_heads, self.head_dim), ("batch", None, "kv_heads", None))
    inv_freq = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    return apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq), v

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None) -> jax.Array:
    b, t, _ = x_btd.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q, k, v = self.project_qkv(x_btd, positions_bt)
    out_btnk = attention(q, k, v, segment_ids_bt, backend=self.kernels)
    return self.o_proj(out_btnk.reshape(b, t, self.num_heads * self.head_dim))

  def cached(self, x_btd: jax.Array, positions_bt: jax.Array, cache: dict, *, sparse: bool = True):
    """Attention of new tokens over a KV cache: (out [B, T, D], cache with their k and v written).

    cache: {"k", "v"} [B, S, H, K]; each row's new tokens sit at its own positions_bt [B, T] and see the cache
    entries at positions <= theirs (entries past a row's last token are never seen). With sparse and one token per
    row (a decode step), the q/k/v and output projections multiply only the rows of W their kept entries select.
    """
    b, t, _ = x_btd.shape
    if sparse and t == 1:  # one sparse_matvecs pass over the kept entries (packed: ternary_matmul)
      q, k, v = (y[:, None] for y in decode_site(x_btd[:, 0], self.q_proj, self.k_proj, self.v_proj))
    else:
      q, k, v = project(x_btd, self.q_proj, self.k_proj, self.v_proj)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    inv_freq = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    q, k = apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq)
    rows = jnp.arange(b)[:, None]
    cache = {"k": cache["k"].at[rows, positions_bt].set(k.astype(cache["k"].dtype)),
             "v": cache["v"].at[rows, positions_bt].set(v.astype(cache["v"].dtype))}
    out_btnk = cache_attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), positions_bt)
    out = out_btnk.reshape(b, t, self.num_heads * self.head_dim)
    out = self.o_proj.decode(out[:, 0])[:, None] if sparse and t == 1 else self.o_proj(out)
    return out, cache
