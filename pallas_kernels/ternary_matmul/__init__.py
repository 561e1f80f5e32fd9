"""int8 activations times packed ternary (1.58-bit) weights with their scales, as BitNet b1.58 inference does."""

from pallas_kernels.ternary_matmul.kernel import BlockSizes
from pallas_kernels.ternary_matmul.ops import pack_ternary, ternary_matmul, unpack_ternary

__all__ = ["BlockSizes", "pack_ternary", "ternary_matmul", "unpack_ternary"]
