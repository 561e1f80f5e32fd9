"""qsparse-jax: Q-Sparse activation sparsity (top-K, straight-through, Block Q-Sparse, 1.58-bit) for JAX and Flax NNX."""

from qsparse_jax.selection import mask_from_thresholds, row_thresholds
from qsparse_jax.sparsity import (
    GRADIENT_MODES,
    SparsityConfig,
    absmax_quantize,
    absmean_ternary,
    block_topk_mask,
    block_topk_sparsify,
    keep_count,
    quantize_activations,
    sparsify,
    ternarize,
    topk_mask,
    topk_sparsify,
)

__version__ = "0.1.0"
