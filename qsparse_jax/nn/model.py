"""The Q-Sparse decoder: a Llama-style transformer whose every projection is top-K sparsified (method.md §1, §3).

Pre-norm blocks x + Attention(RMSNorm(x)) and x + GLU(RMSNorm(x)), RoPE, optional grouped-query attention, ReLU²GLU by
default (SwiGLU as an option), tied or untied embeddings. The four sparsity sites (q/k/v input, output-projection
input, gate/up input, down-projection input) each take their own sparsity; embeddings and the LM head input stay
dense, as in the paper.

Shapes: B batch, T time, D model, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from qsparse_jax.nn.attention import Attention
from qsparse_jax.nn.feedforward import GLUFeedForward
from qsparse_jax.nn.linear import logical_axes
from qsparse_jax.nn.norm import RMSNorm
from qsparse_jax.nn.rope import RopeScaling
from qsparse_jax.ops import SparsityConfig, keep_count
from qsparse_jax.parallel.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# model.remat -> the jax.checkpoint policy of each block (None: jax.checkpoint's default, which saves nothing but the
# block's inputs).
REMAT_POLICIES = {"none": None, "full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}

# Fields that choose how the model runs, not what it computes from its weights: a run may resume with them changed.
EXECUTION_FIELDS = ("kernels", "remat", "scan_layers")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and Q-Sparse settings of the decoder. Sparsities are the fraction S zeroed per token (K = (1 − S) D)."""

  vocab_size: int = 257
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: as many as num_heads (no grouping)
  head_dim: int | None = None  # None: d_model // num_heads
  d_ff: int = 683
  activation: Literal["relu2", "silu"] = "relu2"
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  # RoPE context extension of imported models (layers.RopeScaling): "none", "linear" or "llama3"
  rope_scaling: Literal["none", "linear", "llama3"] = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  tie_embeddings: bool = True
  qkv_bias: bool = False
  norm_eps: float = 1e-6
  # Q-Sparse, method.md §1-§5
  sparsity_qkv: float = 0.0
  sparsity_out: float = 0.0
  sparsity_up: float = 0.0
  sparsity_down: float = 0.0
  gradient: Literal["ste", "masked"] = "ste"
  block: tuple[int, int] | None = None  # Block Q-Sparse n:m at every site, instead of plain top-K
  sparsifier: Literal["topk", "relu"] = "topk"  # "relu": the ablation that puts ReLU at every site instead of top-K
  act_bits: int | None = None  # 8 for the paper's int8 activations
  ternary_weights: bool = False  # BitNet b1.58 weights
  dtype: str = "float32"  # compute dtype; parameters are float32
  kernels: Literal["auto", "xla", "pallas"] = "auto"  # the sparse core's implementation (pallas_kernels.dispatch)
  # What the backward pass keeps of each block: "none" (every activation), "full" (only the block's input; the rest
  # is recomputed) or "dots" (the matmul outputs; the elementwise work is recomputed). jax.checkpoint per block.
  remat: Literal["none", "full", "dots"] = "none"
  # Run the blocks as one lax.scan over their parameters stacked along a new leading axis (scan_blocks): compile
  # time and program size stop growing with depth. The parameters keep their per-layer layout (checkpoints, HF
  # import and export are the same either way); only the compiled program differs.
  scan_layers: bool = False

  def __post_init__(self):
    if self.kernels not in ("auto", "xla", "pallas"):
      raise ValueError(f"model.kernels must be 'auto', 'xla' or 'pallas', got {self.kernels!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"model.scan_layers must be true or false, got {self.scan_layers!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {', '.join(map(repr, REMAT_POLICIES))}, got {self.remat!r}")
    positive = ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
    kv = self.num_kv_heads or self.num_heads
    if self.num_heads % kv:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={kv}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"model.d_model={self.d_model} must be divisible by model.num_heads={self.num_heads} "
                       "(or set model.head_dim)")
    if self.rope_scaling not in ("none", "linear", "llama3"):
      raise ValueError(f"model.rope_scaling must be 'none', 'linear' or 'llama3', got {self.rope_scaling!r}")
    if self.rope_scaling_factor <= 0:
      raise ValueError(f"model.rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
    if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
      raise ValueError("model.rope_high_freq_factor must exceed model.rope_low_freq_factor > 0 for llama3 scaling, got "
                       f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
    for site in self.sites().values():  # validates each sparsity, the gradient mode, block and bits
      del site

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def rope(self) -> RopeScaling | None:
    """The RoPE scaling as layers.RopeScaling (None without one)."""
    if self.rope_scaling == "none":
      return None
    return RopeScaling(self.rope_scaling, self.rope_scaling_factor, self.rope_low_freq_factor,
                       self.rope_high_freq_factor, self.rope_original_max_len)

  def sites(self) -> dict[str, SparsityConfig]:
    """The four sparsity sites of method.md §1 as SparsityConfigs."""
    common = dict(gradient=self.gradient, block=tuple(self.block) if self.block else None, act_bits=self.act_bits,
                  method=self.sparsifier)
    try:
      return {name: SparsityConfig(sparsity=getattr(self, f"sparsity_{name}"), **common)
              for name in ("qkv", "out", "up", "down")}
    except ValueError as err:
      raise ValueError(f"model: {err}") from None

  def site_widths(self) -> dict[str, int]:
    """The input width D of each sparsity site: q/k/v and up read the model width, out the heads' concatenation,
    down the feed-forward width."""
    return {"qkv": self.d_model, "out": self.num_heads * self.head_size, "up": self.d_model, "down": self.d_ff}

  def site_keep_counts(self) -> dict[str, tuple[int, int]]:
    """(D, K) of each top-K site: its input width and the entries it keeps, K = round((1 − S) D) (method.md §1)."""
    return {name: (width, keep_count(width, getattr(self, f"sparsity_{name}")))
            for name, width in self.site_widths().items()}

  def with_sparsity(self, sparsity: float) -> "ModelConfig":
    """The same model with one sparsity at all four sites (the paper's "top-K 70%" is sparsity 0.3)."""
    return dataclasses.replace(self, sparsity_qkv=sparsity, sparsity_out=sparsity, sparsity_up=sparsity,
                               sparsity_down=sparsity)


class Block(nnx.Module):
  """One pre-norm decoder block: x + Attention(RMSNorm(x)), then x + GLU(RMSNorm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    sites = cfg.sites()
    common = dict(ternary_weights=cfg.ternary_weights, kernels=cfg.kernels, dtype=cfg.compute_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.attn = Attention(cfg.d_model, cfg.num_heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_size,
                          qkv_site=sites["qkv"], out_site=sites["out"], qkv_bias=cfg.qkv_bias,
                          rope_theta=cfg.rope_theta, rope_scaling=cfg.rope(), **common)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    self.ffn = GLUFeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation, in_site=sites["up"],
                              down_site=sites["down"], **common)

  def __call__(self, x_btd, positions_bt, segment_ids_bt=None):
    x_btd = x_btd + self.attn(self.attn_norm(x_btd), positions_bt, segment_ids_bt).astype(x_btd.dtype)
    return x_btd + self.ffn(self.ffn_norm(x_btd)).astype(x_btd.dtype)

  def cached(self, x_btd, positions_bt, cache: dict, *, sparse: bool = True):
    """The block over new tokens with a KV cache (Attention.cached): (x [B, T, D], cache)."""
    attn_out, cache = self.attn.cached(self.attn_norm(x_btd), positions_bt, cache, sparse=sparse)
    x_btd = x_btd + attn_out.astype(x_btd.dtype)
    h_btd = self.ffn_norm(x_btd)
    ffn_out = self.ffn.decode(h_btd[:, 0])[:, None] if sparse and x_btd.shape[1] == 1 else self.ffn(h_btd)
    return x_btd + ffn_out.astype(x_btd.dtype), cache


def _run_block(block: Block, x_btd, positions_bt, segment_ids_bt):
  return block(x_btd, positions_bt, segment_ids_bt)


def _capturing(module: nnx.Module) -> bool:
  """Whether module runs inside nnx.capture (inference.evaluation counts each projection's zeros): the blocks then
  run one by one, so that what each sows stays its own."""
  return getattr(module, "__captures__", None) is not None


def scan_blocks(blocks, x_btd: jax.Array, positions_bt: jax.Array, segment_ids_bt: jax.Array | None, *,
                remat: str = "none") -> jax.Array:
  """x [B, T, D] through every block in turn, as one lax.scan: the blocks' parameters are stacked along a new
  leading layer axis (each parameter [L, ...], split over the mesh as the per-layer one is), and the scan body is
  one block, traced and compiled once whatever the depth. Under remat the body is rematerialised with the policy
  of REMAT_POLICIES, as the unrolled loop's blocks are; the residual stream stays split by batch between blocks.

  The per-layer parameters are the model's; the stacked copy is made inside the program, so checkpoints and
  everything that reads parameters by layer are the same with and without the scan.
  """
  graphdef, first = nnx.split(blocks[0])
  states = [first] + [nnx.split(block)[1] for block in blocks[1:]]
  stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *states)

  def body(h_btd, state):
    h_btd = nnx.merge(graphdef, state)(h_btd, positions_bt, segment_ids_bt)
    return constrain(h_btd, ("batch", None, None)), None

  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  x_btd, _ = jax.lax.scan(body, x_btd, stacked)
  return x_btd


class Transformer(nnx.Module):
  """The decoder: tokens [B, T] int -> logits [B, T, V] float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    init = nnx.initializers.normal(stddev=0.02)
    self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32),
                           **logical_axes(("vocab", "embed")))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.vocab_size), jnp.float32),
                               **logical_axes(("embed", "vocab")))

  def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None) -> jax.Array:
    b, t = tokens_bt.shape
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    residual = ("batch", None, None)  # the residual stream: split by batch, whole along the model width
    table_vd = constrain(self.embed[...], ("vocab", None))  # gather whole rows: FSDP's split of D is undone once
    x_btd = constrain(jnp.take(table_vd, tokens_bt, axis=0).astype(self.cfg.compute_dtype), residual)
    if self.cfg.scan_layers and len(self.blocks) > 1 and not _capturing(self.blocks[0]):
      x_btd = scan_blocks(self.blocks, x_btd, positions_bt, segment_ids_bt, remat=self.cfg.remat)
    else:
      run_block = _run_block
      if self.cfg.remat != "none":
        run_block = nnx.remat(_run_block, policy=REMAT_POLICIES[self.cfg.remat])
      for block in self.blocks:
        x_btd = constrain(run_block(block, x_btd, positions_bt, segment_ids_bt), residual)
    x_btd = self.final_norm(x_btd)
    head_dv = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits_btv = jnp.einsum("btd,dv->btv", x_btd, head_dv.astype(x_btd.dtype), preferred_element_type=jnp.float32)
    return constrain(logits_btv, ("batch", None, "vocab"))

  def cached(self, tokens_bt: jax.Array, positions_bt: jax.Array, cache: list[dict], *, sparse: bool = True):
    """Logits [B, T, V] of new tokens at positions_bt [B, T] given the KV cache of earlier ones, and the updated
    cache (init_cache). Prefill is one call with the prompts; each decode step, one with a token per row. With
    sparse, a decode step's projections read only the rows of W that their kept activations select."""
    x_btd = jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.cfg.compute_dtype)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x_btd, layer_cache = block.cached(x_btd, positions_bt, layer_cache, sparse=sparse)
      new_cache.append(layer_cache)
    x_btd = self.final_norm(x_btd)
    head_dv = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits_btv = jnp.einsum("btd,dv->btv", x_btd, head_dv.astype(x_btd.dtype), preferred_element_type=jnp.float32)
    return logits_btv, new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> list[dict]:
  """An empty KV cache: per layer {"k", "v"} zeros [batch, max_len, kv_heads, head_size] in the compute dtype."""
  shape = (batch, max_len, cfg.kv_heads, cfg.head_size)
  return [{"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
          for _ in range(cfg.num_layers)]


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts without allocating memory (nnx.eval_shape): total, embedding and non-embedding."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  total = sum(int(x.size) for x in jax.tree.leaves(state))
  embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


# The site whose sparsified input each projection multiplies (method.md §1).
PROJECTION_SITES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "out", "gate_proj": "up",
                    "up_proj": "up", "down_proj": "down"}


def projection_weights(cfg: ModelConfig) -> dict[str, int]:
  """Weights of each projection of one layer, by its attribute name (PROJECTION_SITES)."""
  d, f, hk, kvk = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
  return {"q_proj": d * hk, "k_proj": d * kvk, "v_proj": d * kvk, "o_proj": hk * d, "gate_proj": d * f,
          "up_proj": d * f, "down_proj": f * d}


def site_keep_fractions(cfg: ModelConfig) -> dict[str, float]:
  """The configured kept fraction of each site: 1 − S, or n/m for Block Q-Sparse."""
  return {name: (1 - site.sparsity) if site.block is None else site.block[0] / site.block[1]
          for name, site in cfg.sites().items()}


def activated_params_per_token(cfg: ModelConfig) -> float:
  """Non-embedding parameters a token multiplies with: each projection's weights times its kept fraction (1 − S)."""
  keep = site_keep_fractions(cfg)
  return cfg.num_layers * sum(w * keep[PROJECTION_SITES[name]] for name, w in projection_weights(cfg).items())
