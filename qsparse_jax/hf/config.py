"""Hugging Face config.json <-> ModelConfig for the Llama, Mistral and Qwen2 families.

All three are the same decoder as qsparse_jax.nn.model with SiLU GLU feed-forwards: grouped-query attention
(num_key_value_heads), RoPE in the rotate-half layout with rope_theta and optional scaling ("linear", "llama3"),
RMSNorm, optionally tied embeddings; Qwen2 adds biases to q/k/v. An export records the Q-Sparse settings under
"qsparse" in config.json, so that importing it again restores them (transformers ignores the key and runs the
weights dense).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qsparse_jax.nn.model import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# The Q-Sparse fields an export records (method.md §1-§5); everything else comes from the architecture's own keys.
QSPARSE_FIELDS = ("sparsity_qkv", "sparsity_out", "sparsity_up", "sparsity_down", "gradient", "block", "act_bits",
                  "ternary_weights")


class UnsupportedModelError(ValueError):
  """A config.json this importer cannot represent exactly."""


def model_type(hf: dict) -> str:
  """"llama" | "mistral" | "qwen2" from config.json, or UnsupportedModelError naming what is supported."""
  kind = hf.get("model_type")
  if kind not in ARCHITECTURES:
    arch = (hf.get("architectures") or [kind])[0]
    raise UnsupportedModelError(f"unsupported architecture {arch!r} (model_type {kind!r}); supported: "
                                f"{', '.join(ARCHITECTURES.values())}")
  return kind


def _rope(hf: dict) -> dict[str, Any]:
  params = dict(hf.get("rope_parameters") or {})  # transformers >= 5
  params.update(hf.get("rope_scaling") or {})  # transformers 4: theta at the top level, scaling here
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind in ("default", None):
    return {"rope_theta": theta}
  if kind == "linear":
    return {"rope_theta": theta, "rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
  if kind == "llama3":
    return {"rope_theta": theta, "rope_scaling": "llama3", "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(params["original_max_position_embeddings"])}
  raise UnsupportedModelError(f"unsupported RoPE scaling {kind!r}; supported: default, linear, llama3")


def from_hf(hf: dict, **overrides) -> ModelConfig:
  """The ModelConfig of a config.json (a dict); overrides replace fields (e.g. sparsity_qkv=0.3, dtype="bfloat16").

  Sparsity settings recorded by `to_hf` are restored; a plain Hugging Face model comes in dense.
  """
  kind = model_type(hf)
  if hf.get("hidden_act", "silu") != "silu":
    raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported; these families use 'silu'")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise UnsupportedModelError("attention_bias / mlp_bias (biases on the output or FFN projections) are not "
                                "supported; only Qwen2's q/k/v biases are")
  max_len = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window") if kind == "mistral" or hf.get("use_sliding_window") else None
  if window:  # full attention equals sliding-window attention on sequences that fit in the window
    max_len = min(max_len, int(window))
  heads = int(hf["num_attention_heads"])
  fields = dict(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads), d_ff=int(hf["intermediate_size"]),
      activation="silu", max_seq_len=max_len, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=kind == "qwen2", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), **_rope(hf))
  recorded = hf.get("qsparse") or {}
  fields.update({k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in QSPARSE_FIELDS})
  fields.update(overrides)
  return ModelConfig(**fields)


def to_hf(cfg: ModelConfig, kind: str | None = None) -> dict:
  """config.json for cfg as a `kind` model ("llama", "mistral", "qwen2"; default: qwen2 with q/k/v biases, else
  llama), with the Q-Sparse settings under "qsparse"."""
  if cfg.activation != "silu":
    raise UnsupportedModelError(f"the model uses activation {cfg.activation!r}; Llama, Mistral and Qwen2 use SiLU "
                                "GLUs (train with model.activation=silu to export)")
  kind = kind or ("qwen2" if cfg.qkv_bias else "llama")
  if kind not in ARCHITECTURES:
    raise UnsupportedModelError(f"unknown architecture {kind!r}; choose one of {', '.join(ARCHITECTURES)}")
  if cfg.qkv_bias != (kind == "qwen2"):
    raise UnsupportedModelError(f"a {kind} model {'has no' if cfg.qkv_bias else 'needs'} q/k/v biases "
                                f"(model.qkv_bias={cfg.qkv_bias})")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "linear":
    rope = {**rope, "rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    rope = {**rope, "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len}
  hf = {
      "architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
      "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
      "rope_scaling": None if rope["rope_type"] == "default" else rope, "torch_dtype": "float32",
      "qsparse": {k: list(v) if isinstance(v, tuple) else v
                  for k, v in dataclasses.asdict(cfg).items() if k in QSPARSE_FIELDS},
  }
  if kind == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  if kind == "mistral":
    hf["sliding_window"] = None
  if kind == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None)
  return hf
