"""Block Q-Sparse (n:m along the hidden axis) activations times W, for prefill and training."""

from pallas_kernels.nm_matmul.ops import nm_matmul

__all__ = ["nm_matmul"]
