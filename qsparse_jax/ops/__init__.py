"""The sparse core as pure JAX operators: top-K selection, top-K + straight-through, Block n:m, quantizers.

No Flax and nothing else of qsparse_jax; pallas_kernels builds on this package and on nothing else of ours.
"""

from qsparse_jax.ops.selection import mask_from_thresholds, row_thresholds
from qsparse_jax.ops.sparsity import (GRADIENT_MODES, SparsityConfig, absmax_quantize, absmean_scale, absmean_ternary,
                                      block_topk_mask, block_topk_sparsify, keep_count, quantize_activations, sparsify,
                                      ternarize, ternary_codes, topk_mask, topk_sparsify)

__all__ = ["GRADIENT_MODES", "SparsityConfig", "absmax_quantize", "absmean_scale", "absmean_ternary", "block_topk_mask",
           "block_topk_sparsify", "keep_count", "mask_from_thresholds", "quantize_activations", "row_thresholds",
           "sparsify", "ternarize", "ternary_codes", "topk_mask", "topk_sparsify"]
