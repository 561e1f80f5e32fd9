"""Hugging Face import and export for the Llama, Mistral and Qwen2 families (safetensors + config.json).

    cfg, params = qsparse_jax.hf.load_pretrained("path/to/Qwen2-0.5B", sparsity_qkv=0.3, ...)
    qsparse_jax.hf.save_pretrained("out/qwen2-qsparse", cfg, params)

No transformers or torch is needed for either; the `hf` extra brings them for the equivalence tests. May import
qsparse_jax.ops, pallas_kernels, parallel and nn; nothing above.
"""

from __future__ import annotations

import pathlib

import jax
from flax import nnx

from qsparse_jax.hf.config import ARCHITECTURES, UnsupportedModelError, from_hf, to_hf
from qsparse_jax.hf.safetensors_io import SafetensorsError
from qsparse_jax.hf.weights import load_params, read_config, save_pretrained, tensor_names
from qsparse_jax.nn.model import ModelConfig


def load_pretrained(directory: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
                    **overrides) -> tuple[ModelConfig, nnx.State]:
  """(ModelConfig, float32 params) of a Hugging Face model directory; overrides set ModelConfig fields (the
  Q-Sparse sparsities, dtype, max_seq_len). With a mesh, parameters are created sharded (read shard by shard)."""
  cfg = from_hf(read_config(directory), **overrides)
  return cfg, load_params(directory, cfg, mesh)


__all__ = ["ARCHITECTURES", "SafetensorsError", "UnsupportedModelError", "from_hf", "load_params", "load_pretrained",
           "read_config", "save_pretrained", "tensor_names", "to_hf"]
