"""Flax NNX layers with top-K sparsified projections, and the Q-Sparse decoder with its frozen ModelConfig.

May import qsparse_jax.ops, pallas_kernels and qsparse_jax.parallel; nothing above.
"""

from qsparse_jax.nn.attention import Attention
from qsparse_jax.nn.attention_kernels import attention, causal_attention, causal_mask
from qsparse_jax.nn.feedforward import GLUFeedForward, glu_activation
from qsparse_jax.nn.linear import (INPUT_ZEROS, Kept, SparseLinear, keep_entries, logical_axes, pack_ternary_layers,
                                   project_kept, sparsify_site)
from qsparse_jax.nn.model import ModelConfig, Transformer
from qsparse_jax.nn.norm import RMSNorm
from qsparse_jax.nn.rope import RopeScaling, apply_rope, rope_frequencies
