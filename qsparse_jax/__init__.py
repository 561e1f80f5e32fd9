"""qsparse-jax: Q-Sparse activation sparsity (top-K, straight-through, Block Q-Sparse, 1.58-bit) for JAX and Flax NNX.

The operators of qsparse_jax.ops are re-exported here; the rest lives in subpackages by role (docs/architecture.md).
"""

from qsparse_jax.ops import (
    GRADIENT_MODES,
    SparsityConfig,
    absmax_quantize,
    absmean_ternary,
    block_topk_mask,
    block_topk_sparsify,
    keep_count,
    mask_from_thresholds,
    quantize_activations,
    row_thresholds,
    sparsify,
    ternarize,
    topk_mask,
    topk_sparsify,
)

__version__ = "0.1.0"
