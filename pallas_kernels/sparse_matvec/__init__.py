"""y = (x ⊙ M) W for decode, reading only the rows of W that the kept activations select."""

from pallas_kernels.sparse_matvec.kernel import BlockSizes
from pallas_kernels.sparse_matvec.ops import sparse_matvec, sparse_matvecs, topk_values_indices

__all__ = ["BlockSizes", "sparse_matvec", "sparse_matvecs", "topk_values_indices"]
