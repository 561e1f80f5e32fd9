"""Exact per-row top-K selection and sparsify (optionally with int8 absmax quantization fused in)."""

from pallas_kernels.topk.kernel import BlockSizes
from pallas_kernels.topk.ops import topk_sparsify, topk_sparsify_int8

__all__ = ["BlockSizes", "topk_sparsify", "topk_sparsify_int8"]
