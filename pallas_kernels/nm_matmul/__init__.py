"""Block Q-Sparse (n:m along the hidden axis) activations times W, for prefill and training."""

from pallas_kernels.nm_matmul.kernel import BlockSizes
from pallas_kernels.nm_matmul.ops import nm_matmul

__all__ = ["BlockSizes", "nm_matmul"]
