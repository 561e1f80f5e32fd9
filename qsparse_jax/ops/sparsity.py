"""Q-Sparse operators as pure JAX functions: top-K masks, straight-through sparsification, Block Q-Sparse, and the
8-bit activation / 1.58-bit weight fake quantizers. No Flax here; the layers of qsparse_jax.nn only call these.

Equations (numbered as in ../shared/docs/method.md, "the paper" is Wang et al. 2024, arXiv 2407.10969):
  §1  Y = (X ⊙ M) Wᵀ,  M = Topk(|X|), K = round((1 − S) · D) per token.
  §2  straight-through gradient ∂Y/∂X = ∂Y/∂(X ⊙ M) ("ste"), or the vanilla ∂Y/∂(X ⊙ M) ⊙ M ("masked").
  §4  Q(X) = RoundClip(127 / (γ + ε) · X, −128, 127), γ = max|X| per token;
      Q_w(W) = RoundClip(W / (α + ε), −1, 1), α = mean|W| per tensor.
  §5  Block Q-Sparse: top-N inside each block of M consecutive values along D.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from qsparse_jax.ops.selection import mask_from_thresholds, row_thresholds

GradientMode = Literal["ste", "masked"]
GRADIENT_MODES = ("ste", "masked")
EPS = 1e-5  # the ε of method.md §4, for both quantizers


# ---------------------------------------------------------------------------------------------------------- checks


def _check_float(x: jax.Array, name: str = "x") -> None:
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be a floating-point array (float32, bfloat16, ...), got dtype {jnp.result_type(x)}")
  if jnp.ndim(x) < 1:
    raise ValueError(f"{name} must have at least one axis (the feature axis D is the last), got a scalar")


def _check_sparsity(sparsity: float) -> None:
  if not 0.0 <= float(sparsity) < 1.0:
    raise ValueError(f"sparsity must be in [0, 1) (the fraction of entries zeroed), got {sparsity}")


def _check_gradient(gradient: str) -> None:
  if gradient not in GRADIENT_MODES:
    raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")


def _check_block(n: int, m: int, dim: int) -> None:
  if not (isinstance(m, int) and m >= 1):
    raise ValueError(f"m (the block size) must be a positive integer, got {m!r}")
  if not (isinstance(n, int) and 1 <= n <= m):
    raise ValueError(f"n (survivors per block) must be an integer in [1, m={m}], got {n!r}")
  if dim % m:
    raise ValueError(f"m={m} must divide the last axis D={dim} (blocks of m consecutive values along D)")


def _check_bits(bits: int, name: str) -> None:
  if not (isinstance(bits, int) and 2 <= bits <= 8):
    raise ValueError(f"{name} must be an integer in [2, 8], got {bits!r}")


def keep_count(dim: int, sparsity: float) -> int:
  """K = round((1 − S) · D), the entries kept per token (method.md §1). Python's round: half to even."""
  _check_sparsity(sparsity)
  return int(round((1.0 - float(sparsity)) * dim))


# ------------------------------------------------------------------------------------------------------ the masks


def topk_mask(x: jax.Array, k: int, *, exact_zero_ties: bool = True) -> jax.Array:
  """M = Topk(|X|) of method.md §1: True at the k largest |x| of each row along the last axis.

  Exactly k True per row; among equal magnitudes the lower index wins. The selection runs on float32 magnitudes
  whatever the dtype of x, with the exact threshold search of `selection.row_thresholds` (bit-identical to a stable
  descending sort, and far cheaper than `jax.lax.top_k` on the CPU).

  Args:
    x: [..., D] floating array.
    k: entries kept per row, 0 <= k <= D.
    exact_zero_ties: False lets a row with fewer than k non-zeros keep all its zeros (more than k True, the same
      x ⊙ M), which is cheaper; for callers that use the mask only to zero entries.

  Returns:
    [..., D] bool.
  """
  _check_float(x)
  dim = x.shape[-1]
  if not (isinstance(k, int) and 0 <= k <= dim):
    raise ValueError(f"k must be an integer in [0, D={dim}], got {k!r}")
  if k == dim:
    return jnp.ones(x.shape, jnp.bool_)
  if k == 0:
    return jnp.zeros(x.shape, jnp.bool_)
  return mask_from_thresholds(x, *row_thresholds(x, k, exact_zero_ties=exact_zero_ties))


def block_topk_mask(x: jax.Array, n: int, m: int, *, exact_zero_ties: bool = True) -> jax.Array:
  """Block Q-Sparse mask (method.md §5): exactly n True in each block of m consecutive entries along the last axis.

  Args:
    x: [..., D] floating array, D divisible by m.
    n, m: survivors per block and block size, 1 <= n <= m.

  Returns:
    [..., D] bool.
  """
  _check_float(x)
  dim = x.shape[-1]
  _check_block(n, m, dim)
  x_bm = x.reshape(*x.shape[:-1], dim // m, m)
  return topk_mask(x_bm, n, exact_zero_ties=exact_zero_ties).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- quantizers (§4)


def absmax_quantize(x: jax.Array, bits: int = 8) -> tuple[jax.Array, jax.Array]:
  """Per-token absmax quantization of method.md §4: Q(X) = RoundClip(Qp / (γ + ε) · X, −Qp − 1, Qp).

  Qp = 2**(bits − 1) − 1 (127 for 8 bits), γ = max|X| over the last axis, computed in float32.

  Args:
    x: [..., D] floating array.
    bits: 2..8.

  Returns:
    q: [..., D] int8 codes, and scale: [..., 1] float32 = Qp / (γ + ε), so that x ≈ q / scale.
  """
  _check_float(x)
  _check_bits(bits, "bits")
  qp = float(2 ** (bits - 1) - 1)
  x32 = x.astype(jnp.float32)
  gamma = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  scale = qp / (gamma + EPS)
  q = jnp.clip(jnp.round(x32 * scale), -qp - 1.0, qp)
  return q.astype(jnp.int8), scale


def absmean_ternary(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """BitNet b1.58 weight quantization of method.md §4: Q_w(W) = RoundClip(W / (α + ε), −1, 1), α = mean|W|.

  Args:
    w: any-shape floating array (one scale for the whole tensor).

  Returns:
    q: int8 codes in {−1, 0, 1} of w's shape, and scale: float32 scalar α + ε, so that w ≈ q · scale.
  """
  _check_float(w, "w")
  scale = absmean_scale(w)
  return ternary_codes(w, scale).astype(jnp.int8), scale


def absmean_scale(w: jax.Array) -> jax.Array:
  """α + ε = mean|W| + ε, the float32 scale of absmean_ternary (method.md §4), one for the whole tensor."""
  return jnp.mean(jnp.abs(w.astype(jnp.float32))) + EPS


def ternary_codes(w: jax.Array, scale: jax.Array) -> jax.Array:
  """RoundClip(W / scale, −1, 1) of method.md §4 as float32, for any part of a tensor (rows of W, say) whose
  whole-tensor scale α + ε is already known: the values absmean_ternary gives those entries."""
  return jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -1.0, 1.0)


def _fake_quant_activations(x: jax.Array, bits: int) -> jax.Array:
  q, scale = absmax_quantize(x, bits)
  # Multiply by the per-token reciprocal (XLA would rewrite a division by a broadcast into this anyway).
  return (q.astype(jnp.float32) * (1.0 / scale)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _straight_through(fn, x: jax.Array) -> jax.Array:
  """fn(x) in the forward pass, the identity in the backward pass (the straight-through estimator of method.md §4).

  A custom_vjp rather than `x + stop_gradient(fn(x) - x)`, whose forward value can differ from fn(x) in the last bit.
  """
  return fn(x)


_straight_through.defvjp(lambda fn, x: (fn(x), None), lambda fn, _, g: (g,))


def _fake_ternary(w: jax.Array) -> jax.Array:
  q, scale = absmean_ternary(w)
  return (q.astype(jnp.float32) * scale).astype(w.dtype)


def quantize_activations(x: jax.Array, bits: int = 8) -> jax.Array:
  """Per-token absmax fake quantization (method.md §4) with a straight-through gradient.

  Returns Q(X) · (1 / scale) in x's dtype (the values an int8 matmul would see, dequantized); ∂/∂x is the identity.
  x: [..., D] floating array.
  """
  _check_float(x)
  _check_bits(bits, "bits")
  return _straight_through(functools.partial(_fake_quant_activations, bits=bits), x)


def ternarize(w: jax.Array) -> jax.Array:
  """Per-tensor absmean ternary fake quantization (BitNet b1.58, method.md §4) with a straight-through gradient.

  Returns Q_w(W) · (α + ε) in w's dtype; ∂/∂w is the identity. w: any-shape floating array.
  """
  _check_float(w, "w")
  return _straight_through(_fake_ternary, w)


# ------------------------------------------------------------------------------- sparsify with straight-through (§1, §2)


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
  """How one projection site sparsifies its input (method.md §1, §2, §4, §5).

  Attributes:
    sparsity: S, the fraction of entries zeroed per token, in [0, 1). 0 disables top-K.
    gradient: "ste" (default, method.md §2) or "masked" (the vanilla rule, for the ablation).
    block: (n, m) for Block Q-Sparse (n survivors per m consecutive values); replaces plain top-K when set.
    act_bits: None, or the bits of per-token absmax activation fake quantization (8 in the paper).
    l2_rescale: rescale each sparsified token to the L2 norm of its dense input (see `topk_sparsify`).
    method: "topk" (Q-Sparse), or "relu" for the paper's ablation that sparsifies by ReLU instead (method.md §2):
      the site's input becomes ReLU(x), with ReLU's own gradient, and has as many zeros as it happens to have;
      sparsity and block must then be unset.
  """

  sparsity: float = 0.0
  gradient: GradientMode = "ste"
  block: tuple[int, int] | None = None
  act_bits: int | None = None
  l2_rescale: bool = False
  method: Literal["topk", "relu"] = "topk"

  def __post_init__(self):
    _check_sparsity(self.sparsity)
    _check_gradient(self.gradient)
    if self.block is not None:
      if len(self.block) != 2:
        raise ValueError(f"block must be a pair (n, m), got {self.block!r}")
      n, m = self.block
      _check_block(n, m, m)
    if self.act_bits is not None:
      _check_bits(self.act_bits, "act_bits")
    if self.method not in ("topk", "relu"):
      raise ValueError(f"method must be 'topk' or 'relu', got {self.method!r}")
    if self.method == "relu" and (self.sparsity or self.block is not None or self.l2_rescale):
      raise ValueError("method 'relu' sparsifies by ReLU alone: leave sparsity at 0, block unset and l2_rescale off")

  @property
  def is_identity(self) -> bool:
    return self.sparsity == 0.0 and self.block is None and self.act_bits is None and self.method == "topk"


def _mask_for(x: jax.Array, cfg: SparsityConfig) -> jax.Array | None:
  # The straight-through rule never reads the mask in the backward pass, so zeros tied at a zero threshold may all
  # count as kept (x ⊙ M is the same); the masked rule multiplies the cotangent by M, which must then be exact.
  exact = cfg.gradient == "masked"
  if cfg.block is not None:
    return block_topk_mask(x, *cfg.block, exact_zero_ties=exact)
  if cfg.sparsity > 0.0:
    return topk_mask(x, keep_count(x.shape[-1], cfg.sparsity), exact_zero_ties=exact)
  return None


def _forward(x: jax.Array, cfg: SparsityConfig):
  mask = _mask_for(x, cfg)  # from |x| before quantization (method.md §4)
  y = _fake_quant_activations(x, cfg.act_bits) if cfg.act_bits is not None else x
  if mask is not None:
    y = jnp.where(mask, y, jnp.zeros((), y.dtype))
  scale = None
  if cfg.l2_rescale and mask is not None:
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    norm_x = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    norm_y = jnp.sqrt(jnp.sum(y32 * y32, axis=-1, keepdims=True))
    scale = norm_x / jnp.maximum(norm_y, jnp.finfo(jnp.float32).tiny)
    y = (y32 * scale).astype(x.dtype)
  return y, mask, scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sparsify(x: jax.Array, cfg: SparsityConfig) -> jax.Array:
  return _forward(x, cfg)[0]


def _sparsify_fwd(x, cfg):
  y, mask, scale = _forward(x, cfg)
  return y, (mask if cfg.gradient == "masked" else None, scale)


def _sparsify_bwd(cfg, residuals, g):
  mask, scale = residuals
  if scale is not None:
    g = (g.astype(jnp.float32) * scale).astype(g.dtype)
  if mask is not None:
    g = jnp.where(mask, g, jnp.zeros((), g.dtype))
  return (g,)


_sparsify.defvjp(_sparsify_fwd, _sparsify_bwd)


def sparsify(x: jax.Array, cfg: SparsityConfig) -> jax.Array:
  """Apply one site's `SparsityConfig` to x: [..., D] (the input of a projection), differentiably.

  Forward: mask from |x| (top-K or block n:m), then optional int8 fake quantization, then the mask, then the optional
  L2 rescale: y = s ⊙ (Q(x) ⊙ M). Backward: the straight-through rule of cfg.gradient (method.md §2) through mask and
  quantizer alike, times s if rescaled (s is held constant).
  """
  _check_float(x)
  if cfg.is_identity:
    return x
  if cfg.method == "relu":  # the ablation: ReLU's zeros instead of top-K's, ReLU's gradient
    x = jax.nn.relu(x)
    return x if cfg.act_bits is None else _sparsify(x, dataclasses.replace(cfg, method="topk"))
  return _sparsify(x, cfg)


def topk_sparsify(x: jax.Array, sparsity: float, *, gradient: GradientMode = "ste",
                  l2_rescale: bool = False) -> jax.Array:
  """X ⊙ M with M = Topk(|X|) and K = round((1 − S) · D) per token (method.md §1), straight-through (§2).

  Args:
    x: [..., D] floating array.
    sparsity: S in [0, 1); 0 returns x unchanged.
    gradient: "ste" passes the cotangent to all D inputs unmasked; "masked" multiplies it by M.
    l2_rescale: the paper's "re-scale the tensor by its L2 norm after top-K" (the official code does not). Off by
      default. When on, each token of the result is multiplied by s = ‖x‖₂ / ‖x ⊙ M‖₂ (norms over the last axis, in
      float32), so the sparse token keeps the L2 norm of the dense one; s is treated as a constant in the backward
      pass, so the cotangent is scaled by s as well.

  Returns:
    [..., D], x's dtype.
  """
  return sparsify(x, SparsityConfig(sparsity=sparsity, gradient=gradient, l2_rescale=l2_rescale))  # validates


def block_topk_sparsify(x: jax.Array, n: int, m: int, *, gradient: GradientMode = "ste") -> jax.Array:
  """Block Q-Sparse (method.md §5): keep the n largest |x| in each block of m consecutive values along the last axis.

  Sparsity is 1 − n/m; gradient as in `topk_sparsify`. x: [..., D], D divisible by m. Returns [..., D].
  """
  _check_float(x)
  _check_block(n, m, x.shape[-1])  # SparsityConfig checks n:m and the gradient mode, not D
  return sparsify(x, SparsityConfig(block=(n, m), gradient=gradient))
