"""The GLU feed-forward (ReLU²GLU, method.md §3, or SwiGLU) with two Q-Sparse sites: the shared gate/up input and
the down-projection input (method.md §1).

Shapes: B batch, T time, D model, F feed-forward.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from qsparse_jax.nn.linear import DENSE, SparseLinear, decode_site, project, site_kwargs
from qsparse_jax.ops import SparsityConfig
from qsparse_jax.parallel.sharding import constrain


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

  gate_proj and up_proj carry `in_site`: their shared input is sparsified once (linear.project) and each multiplies
  with the site's full treatment (n:m kernel, packed int8 x ternary, kept-entries decode); `down_site` sparsifies
  the GLU product (after the activation, as method.md §1 prescribes for SiLU models) inside the down projection.

  __call__(x_btd) -> [..., D]; hidden width F = d_ff.
  """

  def __init__(self, d_model: int, d_ff: int, *, activation: Activation = "relu2", in_site: SparsityConfig = DENSE,
               down_site: SparsityConfig = DENSE, ternary_weights: bool = False, kernels: str = "auto", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    glu_activation(jnp.zeros(()), activation)  # validate the name now
    common = dict(use_bias=False, ternary_weights=ternary_weights, kernels=kernels, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
    self.kernels = kernels
    self.gate_proj = SparseLinear(d_model, d_ff, kernel_axes=("embed", "mlp"), **site_kwargs(in_site), **common)
    self.up_proj = SparseLinear(d_model, d_ff, kernel_axes=("embed", "mlp"), **site_kwargs(in_site), **common)
    self.down_proj = SparseLinear(d_ff, d_model, kernel_axes=("mlp", "embed"), **site_kwargs(down_site), **common)
    self.in_site = in_site
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, up = project(x, self.gate_proj, self.up_proj)
    hidden = glu_activation(gate, self.activation) * up
    if hidden.ndim == 3:
      hidden = constrain(hidden, ("batch", None, "mlp"))
    return self.down_proj(hidden)

  def decode(self, x_bd: jax.Array) -> jax.Array:
    """One token per row [B, D]: gate, up and down multiply only the rows of W their kept entries select."""
    gate, up = decode_site(x_bd, self.gate_proj, self.up_proj)
    return self.down_proj.decode(glu_activation(gate, self.activation) * up)
