"""Public entries: pack_ternary / unpack_ternary (2 bits per weight) and ternary_matmul.

The XLA path (the CPU's, and GPUs' under "auto" until gpu_verified records the GPU kernel) unpacks the weights and
multiplies int8 × int8 into int32; on a TPU the kernel of kernel.py (pallas_kernels.dispatch.select: for the shapes
`kernel_supported` accepts, or backend="pallas") unpacks tile by tile in VMEM; compiled for an H100/H200 with
backend="pallas" the Mosaic GPU kernel of kernel_gpu.py unpacks in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.ternary_matmul import kernel_gpu
from pallas_kernels.ternary_matmul.kernel import BlockSizes, code_planes, ternary_matmul_pallas, unpack_plane

PALLAS_PLATFORMS = ("tpu",)


def kernel_supported(codes_shape: tuple[int, ...], packed_shape: tuple[int, ...]) -> bool:
  """Whether "auto" runs the kernel on a TPU: N a multiple of 128 and Q = D / 4 a multiple of 32 (the int8 tile of
  a whole-Q block; compiled for v5p and v6e at decode and training shapes, D 4096 and 11008, in
  tests/test_tpu_compile.py); any number of tokens."""
  q, n_out = packed_shape
  return q % dispatch.sublane_tile(jnp.int8) == 0 and n_out % dispatch.LANES == 0


def gpu_kernel_supported(packed_shape: tuple[int, ...]) -> bool:
  """Whether the Mosaic GPU kernel takes these weights with its default blocks: N a multiple of 128 (the
  warpgroup's columns) and Q = D / 4 a multiple of 32 (a batch-1 block of planes copies 128 bytes); compiled for H100
  and H200 at a 7B model's decode shapes and a 256-row prefill tile in tests/test_gpu_kernels.py."""
  q, n_out = packed_shape
  return q % 32 == 0 and n_out % kernel_gpu.THREADS == 0


def pack_ternary(codes_dn: jax.Array) -> jax.Array:
  """int codes in {−1, 0, 1} [D, N] (D a multiple of 4) -> uint8 [D/4, N], 4 weights per byte (see kernel.py)."""
  d = codes_dn.shape[0]
  if codes_dn.ndim != 2 or d % 4:
    raise ValueError(f"ternary codes must be [D, N] with D a multiple of 4, got shape {codes_dn.shape}")
  bits = jnp.where(codes_dn < 0, 2, codes_dn).astype(jnp.uint8).reshape(4, d // 4, -1)
  return bits[0] | (bits[1] << 2) | (bits[2] << 4) | (bits[3] << 6)


def unpack_ternary(packed_qn: jax.Array) -> jax.Array:
  """uint8 [Q, N] -> int8 codes [4Q, N] in {−1, 0, 1}; the inverse of pack_ternary."""
  return jnp.concatenate([unpack_plane(packed_qn, plane) for plane in range(4)])


def _xla_matmul(codes_td, scale_t1, packed_qn, w_scale):
  acc = jnp.dot(codes_td, unpack_ternary(packed_qn), preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * (w_scale / scale_t1)


def _kernel_matmul(codes_td, scale_t1, packed_qn, w_scale, *, block_sizes, interpret):
  t = codes_td.shape[0]
  pad = ((0, dispatch.round_up(t, block_sizes.block_t) - t), (0, 0))
  # Padded rows: codes 0 with scale 1, their outputs dropped.
  planes = code_planes(jnp.pad(codes_td, pad), packed_qn.shape[0])
  y = ternary_matmul_pallas(planes, jnp.pad(scale_t1, pad, constant_values=1.0), packed_qn, w_scale,
                            block_sizes=block_sizes, interpret=interpret)
  return y[:t]


def ternary_matmul(codes: jax.Array, act_scale: jax.Array, packed_qn: jax.Array, w_scale: jax.Array, *,
                   backend: str = "auto", block_sizes: BlockSizes | None = None) -> jax.Array:
  """y [..., N] float32 = x W for x ≈ codes / act_scale (int8, per-token absmax: qsparse_jax.absmax_quantize) and
  W ≈ unpack(packed) · w_scale (per-tensor absmean: qsparse_jax.absmean_ternary, packed by pack_ternary).

  codes: int8 [..., D]; act_scale: [..., 1]; packed_qn: uint8 [D/4, N]; w_scale: scalar. block_sizes: the TPU
  kernel's tiles (default: per chip, fitted to the shapes); the GPU kernel fits its own (kernel_gpu.GpuBlockSizes).
  """
  if codes.dtype != jnp.int8 or packed_qn.dtype != jnp.uint8:
    raise ValueError(f"expected int8 activation codes and uint8 packed weights, got {codes.dtype} and "
                     f"{packed_qn.dtype}")
  if packed_qn.ndim != 2 or codes.shape[-1] != 4 * packed_qn.shape[0]:
    raise ValueError(f"activations [..., D] need packed weights [D/4, N]: got {codes.shape} and {packed_qn.shape}")
  if act_scale.shape != codes.shape[:-1] + (1,):
    raise ValueError(f"act_scale must be [..., 1] = {codes.shape[:-1] + (1,)}, got {act_scale.shape}")
  dispatch.check(backend)
  lead, d = codes.shape[:-1], codes.shape[-1]
  codes_td, scale_t1 = codes.reshape(-1, d), act_scale.reshape(-1, 1).astype(jnp.float32)
  w_scale = jnp.asarray(w_scale, jnp.float32)
  t, (q, n_out) = codes_td.shape[0], packed_qn.shape
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(t, q, n_out, chip=dispatch.chip_name())
  elif not isinstance(block_sizes, BlockSizes):
    raise ValueError(f"block_sizes must be a pallas_kernels.ternary_matmul BlockSizes, got {block_sizes!r}")
  else:
    block_sizes.validate(dispatch.round_up(t, block_sizes.block_t), q, n_out)
  gpu = dispatch.GpuKernel("ternary_matmul", kernel_gpu.matmul)  # its own blocks (kernel_gpu.GpuBlockSizes)
  y = dispatch.select(backend, functools.partial(_kernel_matmul, block_sizes=block_sizes), _xla_matmul,
                      codes_td, scale_t1, packed_qn, w_scale, kernel_ok=kernel_supported(codes.shape, packed_qn.shape),
                      gpu=gpu if gpu_kernel_supported(packed_qn.shape) else None)
  return y.reshape(*lead, n_out)
