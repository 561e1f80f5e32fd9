"""Rotary position embedding (RoPE) in the rotate-half layout of Llama / Hugging Face, with the context extensions
of imported models (linear position interpolation, Llama 3.1 scaling).

Shapes: B batch, T time, N heads, K head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp


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
