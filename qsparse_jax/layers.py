"""Flax NNX layers of a Q-Sparse transformer: SparseLinear, GLU feed-forward, attention, RMSNorm, RoPE.

Every projection sees its input through a `SparsityConfig` (method.md §1): the four sites are the shared q/k/v input,
the output-projection input, the shared gate/up input and the down-projection input, each with its own sparsity.
Shared sites are sparsified once and feed their projections (one selection for q, k and v). Parameters carry logical
axis names ("embed", "mlp", "heads", "kv_heads") as `out_sharding` metadata; `sharding.py` maps them onto a mesh.

Shapes: B batch, T query time, S key time, D model, N query heads, G query heads per kv head, H kv heads, K head dim,
F feed-forward.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import dispatch
from pallas_kernels.nm_matmul import ops as nm_ops
from pallas_kernels.sparse_matvec import ops as smv_ops
from pallas_kernels.topk import ops as topk_ops
from pallas_kernels.ternary_matmul import ops as tm_ops
from qsparse_jax.sharding import constrain
from qsparse_jax.sparsity import (SparsityConfig, absmax_quantize, absmean_ternary, keep_count, quantize_activations,
                                 sparsify, ternarize)

DENSE = SparsityConfig()


def logical_axes(axes: tuple[str | None, ...]) -> dict:
  """nnx.Variable metadata naming a parameter's logical axes; no mesh is needed to build a layer (the names are
  mapped to mesh axes, and shardings applied, under jit)."""
  return {"out_sharding": axes, "eager_sharding": False}


def sparsify_site(x: jax.Array, site: SparsityConfig, kernels: str = "auto") -> jax.Array:
  """sparsify(x, site), through the Pallas top-K kernel when `kernels` selects Pallas for a plain top-K site.

  kernels: "auto" (Pallas where a kernel is compiled for the platform, plain JAX on the CPU), "xla" or "pallas"
  (pallas_kernels.dispatch). Sites with n:m blocks, int8 activations or the L2 rescale use the plain-JAX operators.
  """
  k = keep_count(x.shape[-1], site.sparsity)
  if 0 < k < x.shape[-1] and site.block is None and site.act_bits is None and not site.l2_rescale:
    if dispatch.resolve(kernels, pallas_platforms=topk_ops.PALLAS_PLATFORMS)[0] == "pallas":
      return topk_ops.topk_sparsify(x, k, gradient=site.gradient, backend=kernels)
  return sparsify(x, site)


class Kept(NamedTuple):
  """A top-K sparsified input with one token per row, as its kept entries: values [B, K] at indices [B, K]."""

  values: jax.Array
  indices: jax.Array


def keep_entries(x_bd: jax.Array, site: SparsityConfig) -> Kept | None:
  """sparsify(x_bd, site) in kept form, the input of the sparse decode matvec; None where the site keeps every
  entry or is n:m or L2-rescaled (those decode through the dense path). With act_bits the kept values are the
  fake-quantized ones (the per-token scale comes from max|x|, which top-K always keeps)."""
  d = x_bd.shape[-1]
  k = keep_count(d, site.sparsity)
  if not 0 < k < d or site.block is not None or site.l2_rescale:
    return None
  values, indices = smv_ops.topk_values_indices(x_bd, k)
  if site.act_bits is not None:
    values = jnp.take_along_axis(quantize_activations(x_bd, site.act_bits), indices, axis=-1)
  return Kept(values, indices)


# Name of the [zeros, entries] count a SparseLinear sows for nnx.capture(..., nnx.Intermediate): how many entries of
# the input it multiplied were zero (after its site's top-K, and any zeros the input had already).
INPUT_ZEROS = "input_zeros"


def site_kwargs(cfg: SparsityConfig) -> dict:
  """SparseLinear keyword arguments that reproduce a site config."""
  return dataclasses.asdict(cfg)


class PackedTernary(nnx.Variable):
  """Inference-only state of a packed ternary SparseLinear (SparseLinear.pack): its codes or their scale."""


def pack_ternary_layers(model: nnx.Module) -> int:
  """Pack every ternary SparseLinear of model in place (SparseLinear.pack); returns how many were packed."""
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseLinear) and m.ternary_weights
            and not m.is_packed]
  for layer in layers:
    layer.pack()
  return len(layers)


class SparseLinear(nnx.Linear):
  """A drop-in `nnx.Linear` whose input is top-K sparsified per token: y = (x ⊙ M) W + b (method.md §1).

  Takes every argument of `nnx.Linear` (and is one), plus:
    sparsity: S in [0, 1), the fraction of input entries zeroed per token; 0 makes it exactly nnx.Linear.
    gradient: "ste" (straight-through, method.md §2) or "masked".
    block: (n, m) for Block Q-Sparse (method.md §5) instead of plain top-K.
    act_bits: per-token absmax fake quantization of the input to this many bits (8 in the paper, method.md §4);
      the mask is taken from |x| before quantization.
    ternary_weights: BitNet b1.58 absmean ternary fake quantization of the kernel (method.md §4).
    l2_rescale: see `topk_sparsify`.
    method: "topk", or "relu" for the ablation that sparsifies the input by ReLU instead (SparsityConfig).
    kernel_axes: logical axis names of the [in, out] kernel, default ("embed", "mlp"); the bias gets the second.
    kernels: "auto" | "xla" | "pallas", which implementation of the sparse core to use (see `sparsify_site`); with
      Pallas selected, an n:m site multiplies through the nm_matmul kernel.

  Input [..., in_features] -> output [..., out_features]. Parameters are `kernel` [in, out] and `bias` [out], named
  as in nnx.Linear, so state moves between the two unchanged.
  """

  def __init__(self, in_features: int, out_features: int, *, sparsity: float = 0.0, gradient: str = "ste",
               block: tuple[int, int] | None = None, act_bits: int | None = None, ternary_weights: bool = False,
               l2_rescale: bool = False, method: str = "topk",
               kernel_axes: tuple[str | None, str | None] = ("embed", "mlp"), kernels: str = "auto",
               rngs: nnx.Rngs, **linear_kwargs):
    site = SparsityConfig(sparsity=sparsity, gradient=gradient, block=tuple(block) if block else None,
                          act_bits=act_bits, l2_rescale=l2_rescale, method=method)
    linear_kwargs.setdefault("kernel_metadata", logical_axes(tuple(kernel_axes)))
    linear_kwargs.setdefault("bias_metadata", logical_axes((kernel_axes[1],)))
    super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
    if site.block is not None and in_features % site.block[1]:
      raise ValueError(f"block m={site.block[1]} must divide in_features={in_features}")
    dispatch.resolve(kernels, pallas_platforms=())  # validate the name now
    self.site = site
    self.ternary_weights = ternary_weights
    self.kernels = kernels

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    n_m_kernel = (self.site.block is not None and self.site.act_bits is None and not self.is_packed
                  and dispatch.resolve(self.kernels, pallas_platforms=nm_ops.PALLAS_PLATFORMS)[0] == "pallas")
    x = inputs if n_m_kernel else sparsify_site(inputs, self.site, self.kernels)
    if getattr(self, "__captures__", None) is not None:  # inside nnx.capture (qsparse_jax.evaluation): count zeros
      seen = sparsify_site(inputs, self.site, "xla") if n_m_kernel else x
      self.sow(nnx.Intermediate, INPUT_ZEROS, jnp.stack([jnp.sum(seen == 0), seen.size]).astype(jnp.float32),
               init_fn=lambda: jnp.zeros(2, jnp.float32), reduce_fn=jnp.add)
    if self.is_packed:
      return self._packed_call(inputs, x)
    kernel = ternarize(self.kernel[...]) if self.ternary_weights else self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
    if n_m_kernel:  # Block Q-Sparse: the mask is made tile by tile inside the matmul
      y = nm_ops.nm_matmul(x, kernel, *self.site.block, backend=self.kernels)
    else:
      kwargs = {"out_sharding": out_sharding}
      if self.preferred_element_type is not None:
        kwargs["preferred_element_type"] = self.preferred_element_type
      y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kwargs)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y

  # ----------------------------------------------------------------------- packed ternary weights (inference)

  @property
  def is_packed(self) -> bool:
    """Whether pack() replaced the float kernel by 2-bit ternary codes."""
    return getattr(self, "packed_kernel", None) is not None

  def pack(self) -> None:
    """Replace the float kernel by the BitNet b1.58 inference form (method.md §4): ternary codes Q_w(W) packed four
    to a byte (pallas_kernels.ternary_matmul.pack_ternary, [in/4, out] uint8) and the scale α + ε. The layer then
    multiplies through ternary_matmul: int8 activation codes times ternary weights, accumulated exactly in int32;
    the same function as the fake-quantized training forward, up to float rounding, reading 1/16 of the bytes."""
    if not self.ternary_weights:
      raise ValueError("only a layer with ternary_weights=True can be packed")
    if self.in_features % 4:
      raise ValueError(f"packing needs in_features divisible by 4, got {self.in_features}")
    if self.site.l2_rescale:
      raise ValueError("a site with l2_rescale cannot be packed (its inputs are not integer codes times a scale)")
    codes, scale = absmean_ternary(self.kernel[...])
    self.packed_kernel = PackedTernary(tm_ops.pack_ternary(codes))
    self.kernel_scale = PackedTernary(scale)
    del self.kernel

  def _packed_call(self, inputs: jax.Array, x: jax.Array) -> jax.Array:
    """y [..., out] from the packed codes; x is sparsify_site(inputs): with act_bits, its zeros mask the int8
    codes of absmax_quantize(inputs) (the scale comes from max|x|, which top-K keeps)."""
    packed, alpha = self.packed_kernel[...], self.kernel_scale[...]
    if self.site.act_bits is not None:
      codes, scale = absmax_quantize(inputs, self.site.act_bits)
      codes = jnp.where(x != 0, codes, jnp.int8(0))
      y = tm_ops.ternary_matmul(codes, scale, packed, alpha, backend=self.kernels)
    else:  # float activations: unpack the codes (exact in float32) and scale once
      y = jnp.dot(x.astype(jnp.float32), tm_ops.unpack_ternary(packed).astype(jnp.float32)) * alpha
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype or inputs.dtype)

  def project_kept(self, kept: Kept) -> jax.Array:
    """y [B, out] = (x ⊙ M) W + b from the kept entries of x, reading only their rows of W (sparse_matvec)."""
    (y,) = project_kept(kept, self)
    return y

  def decode(self, x_bd: jax.Array) -> jax.Array:
    """The projection of one token per row [B, in]: through its own site's kept entries when it has them (packed
    ternary layers multiply all their 2-bit codes instead: ternary_matmul)."""
    kept = None if self.is_packed else keep_entries(x_bd, self.site)
    return self(x_bd) if kept is None else self.project_kept(kept)


def project_kept(kept: Kept, *layers: SparseLinear) -> tuple[jax.Array, ...]:
  """y [B, out_l] = (x ⊙ M) W_l + b_l for each layer l that reads the same sparsified input (q, k and v; gate and
  up): one sparse_matvecs pass over the kept entries, reading only their rows of every W_l."""
  dtype = layers[0].dtype or kept.values.dtype
  kernels = tuple((ternarize(l.kernel[...]) if l.ternary_weights else l.kernel[...]).astype(dtype) for l in layers)
  ys = smv_ops.sparse_matvecs(kept.values.astype(dtype), kept.indices, kernels, backend=layers[0].kernels)
  return tuple(y if l.bias is None else y + l.bias[...].astype(y.dtype) for y, l in zip(ys, layers))


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x²) + eps) · scale over the last axis, computed in float32 (Llama's RMSNorm)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    del rngs  # no random state; accepted for a uniform constructor
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **logical_axes(("embed",)))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE context extension of pretrained models (Hugging Face `rope_scaling` / `rope_parameters`).

  kind: "none"; "linear" (every frequency divided by factor: position interpolation); or "llama3" (Llama 3.1:
  wavelengths longer than original_max_len / low_freq_factor are divided by factor, shorter than
  original_max_len / high_freq_factor kept, and those between interpolated smoothly).
  """

  kind: Literal["none", "linear", "llama3"] = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None) -> jax.Array:
  """Inverse frequencies theta^(−2i/K), i < K/2, float32 [K/2], with the context extension of `scaling`."""
  if head_dim % 2:
    raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None or scaling.kind == "none":
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  if scaling.kind != "llama3":
    raise ValueError(f"unknown RoPE scaling {scaling.kind!r}; expected 'none', 'linear' or 'llama3'")
  wavelength = 2 * jnp.pi / inv_freq
  long_wavelength = scaling.original_max_len / scaling.low_freq_factor  # beyond it: divided by factor
  short_wavelength = scaling.original_max_len / scaling.high_freq_factor  # below it: unchanged
  smooth = ((scaling.original_max_len / wavelength - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  between = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return jnp.where(wavelength > long_wavelength, inv_freq / scaling.factor,
                   jnp.where(wavelength < short_wavelength, inv_freq, between))


def apply_rope(x_btnk: jax.Array, positions_bt: jax.Array, inv_freq_k: jax.Array) -> jax.Array:
  """Rotary position embedding in the rotate-half layout of Llama/Hugging Face.

  x_btnk: [B, T, N, K]; positions_bt: [B, T] integer positions; inv_freq_k: [K/2]. Returns x's shape and dtype.
  """
  angles_btk = positions_bt[..., None].astype(jnp.float32) * inv_freq_k
  cos = jnp.cos(angles_btk)[:, :, None, :]
  sin = jnp.sin(angles_btk)[:, :, None, :]
  x1, x2 = jnp.split(x_btnk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_btnk.dtype)


def causal_attention(q_btnk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, mask_bts: jax.Array) -> jax.Array:
  """softmax(q kᵀ / sqrt(K) + mask) v with grouped-query heads (N = H·G), softmax in float32.

  q: [B, T, N, K]; k, v: [B, S, H, K]; mask_bts: [B, T, S] bool, True where query t may attend to key s.
  Returns [B, T, N, K]. Not sparsified (method.md §1: QKᵀ and softmax·V stay dense).
  """
  b, t, n, kd = q_btnk.shape
  h = k_bshk.shape[2]
  if n % h:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads H={h}")
  q_bthgk = q_btnk.reshape(b, t, h, n // h, kd)
  logits = jnp.einsum("bthgk,bshk->bhgts", q_bthgk, k_bshk, preferred_element_type=jnp.float32)
  logits = logits * (kd ** -0.5)
  logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bshk.dtype)
  out = jnp.einsum("bhgts,bshk->bthgk", probs, v_bshk)
  return out.reshape(b, t, n, kd)


def causal_mask(positions_bt: jax.Array, segment_ids_bt: jax.Array | None = None) -> jax.Array:
  """[B, T, T] bool: key s visible to query t when s <= t (by position) and, if given, in the same segment."""
  mask = positions_bt[:, None, :] <= positions_bt[:, :, None]
  if segment_ids_bt is not None:
    mask &= segment_ids_bt[:, None, :] == segment_ids_bt[:, :, None]
  return mask


class Attention(nnx.Module):
  """Causal multi-head (optionally grouped-query) attention with RoPE and two Q-Sparse sites (method.md §1).

  The input x is sparsified once by `qkv_site` and feeds q, k and v; the attention output is sparsified by `out_site`
  inside the output projection. qkv_bias adds biases to q/k/v (Qwen2).

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
    self.q_proj = SparseLinear(d_model, num_heads * head_dim, use_bias=qkv_bias, kernel_axes=("embed", "heads"),
                               **common)
    self.k_proj = SparseLinear(d_model, num_kv_heads * head_dim, use_bias=qkv_bias,
                               kernel_axes=("embed", "kv_heads"), **common)
    self.v_proj = SparseLinear(d_model, num_kv_heads * head_dim, use_bias=qkv_bias,
                               kernel_axes=("embed", "kv_heads"), **common)
    self.o_proj = SparseLinear(num_heads * head_dim, d_model, use_bias=False, kernel_axes=("heads", "embed"),
                               **site_kwargs(out_site), **common)
    self.qkv_site = qkv_site
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.rope_theta = rope_theta
    self.rope_scaling = rope_scaling

  def project_qkv(self, x_btd: jax.Array, positions_bt: jax.Array):
    """Sparsify x once (the q/k/v site) and return RoPE'd q [B,T,N,K], k [B,T,H,K] and v [B,T,H,K]."""
    b, t, _ = x_btd.shape
    xs_btd = sparsify_site(x_btd, self.qkv_site, self.kernels)
    q = constrain(self.q_proj(xs_btd).reshape(b, t, self.num_heads, self.head_dim), ("batch", None, "heads", None))
    k = constrain(self.k_proj(xs_btd).reshape(b, t, self.num_kv_heads, self.head_dim),
                  ("batch", None, "kv_heads", None))
    v = constrain(self.v_proj(xs_btd).reshape(b, t, self.num_kv_heads, self.head_dim),
                  ("batch", None, "kv_heads", None))
    inv_freq = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    return apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq), v

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None) -> jax.Array:
    b, t, _ = x_btd.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q, k, v = self.project_qkv(x_btd, positions_bt)
    out_btnk = causal_attention(q, k, v, causal_mask(positions_bt, segment_ids_bt))
    return self.o_proj(out_btnk.reshape(b, t, self.num_heads * self.head_dim))

  def cached(self, x_btd: jax.Array, positions_bt: jax.Array, cache: dict, *, sparse: bool = True):
    """Attention of new tokens over a KV cache: (out [B, T, D], cache with their k and v written).

    cache: {"k", "v"} [B, S, H, K]; each row's new tokens sit at its own positions_bt [B, T] and see the cache
    entries at positions <= theirs (entries past a row's last token are never seen). With sparse and one token per
    row (a decode step), the q/k/v and output projections multiply only the rows of W their kept entries select.
    """
    b, t, _ = x_btd.shape
    kept = keep_entries(x_btd[:, 0], self.qkv_site) if sparse and t == 1 and not self.q_proj.is_packed else None
    if kept is None:
      xs_btd = sparsify_site(x_btd, self.qkv_site, self.kernels)
      q, k, v = self.q_proj(xs_btd), self.k_proj(xs_btd), self.v_proj(xs_btd)
    else:
      q, k, v = (y[:, None] for y in project_kept(kept, self.q_proj, self.k_proj, self.v_proj))
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    inv_freq = rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
    q, k = apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq)
    rows = jnp.arange(b)[:, None]
    cache = {"k": cache["k"].at[rows, positions_bt].set(k.astype(cache["k"].dtype)),
             "v": cache["v"].at[rows, positions_bt].set(v.astype(cache["v"].dtype))}
    visible_bts = jnp.arange(cache["k"].shape[1])[None, None, :] <= positions_bt[:, :, None]
    out_btnk = causal_attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), visible_bts)
    out = out_btnk.reshape(b, t, self.num_heads * self.head_dim)
    out = self.o_proj.decode(out[:, 0])[:, None] if sparse and t == 1 else self.o_proj(out)
    return out, cache


Activation = Literal["relu2", "silu"]


def glu_activation(gate: jax.Array, name: Activation) -> jax.Array:
  """ReLU(g)² (ReLU²GLU, method.md §3, for training from scratch) or SiLU(g) (SwiGLU, for pretrained models)."""
  if name == "relu2":
    return jnp.square(jax.nn.relu(gate))
  if name == "silu":
    return jax.nn.silu(gate)
  raise ValueError(f"activation must be 'relu2' or 'silu', got {name!r}")


class GLUFeedForward(nnx.Module):
  """GLU feed-forward with two Q-Sparse sites: down(act(gate(x̃)) ⊙ up(x̃)), x̃ = x sparsified (method.md §1, §3).

  `in_site` sparsifies the shared input of gate and up once; `down_site` sparsifies the GLU product (after the
  activation, as method.md §1 prescribes for SiLU models) inside the down projection.

  __call__(x_btd) -> [..., D]; hidden width F = d_ff.
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: Activation = "relu2", in_site: SparsityConfig = DENSE,
               down_site: SparsityConfig = DENSE, ternary_weights: bool = False, kernels: str = "auto", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    glu_activation(jnp.zeros(()), activation)  # validate the name now
    common = dict(use_bias=False, ternary_weights=ternary_weights, kernels=kernels, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
    self.kernels = kernels
    self.gate_proj = SparseLinear(d_model, d_ff, kernel_axes=("embed", "mlp"), **common)
    self.up_proj = SparseLinear(d_model, d_ff, kernel_axes=("embed", "mlp"), **common)
    self.down_proj = SparseLinear(d_ff, d_model, kernel_axes=("mlp", "embed"), **site_kwargs(down_site), **common)
    self.in_site = in_site
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    xs = sparsify_site(x, self.in_site, self.kernels)
    hidden = glu_activation(self.gate_proj(xs), self.activation) * self.up_proj(xs)
    if hidden.ndim == 3:
      hidden = constrain(hidden, ("batch", None, "mlp"))
    return self.down_proj(hidden)

  def decode(self, x_bd: jax.Array) -> jax.Array:
    """One token per row [B, D]: gate, up and down multiply only the rows of W their kept entries select."""
    kept = None if self.gate_proj.is_packed else keep_entries(x_bd, self.in_site)
    if kept is None:
      xs = sparsify_site(x_bd, self.in_site, self.kernels)
      hidden = glu_activation(self.gate_proj(xs), self.activation) * self.up_proj(xs)
    else:
      gate, up = project_kept(kept, self.gate_proj, self.up_proj)
      hidden = glu_activation(gate, self.activation) * up
    return self.down_proj.decode(hidden)
