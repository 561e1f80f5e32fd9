"""Public entries: pack_ternary / unpack_ternary (2 bits per weight) and ternary_matmul.

The XLA path (the CPU's, and GPUs') unpacks the weights and multiplies int8 × int8 into int32; "pallas" runs
kernel.py (Mosaic TPU; interpret mode elsewhere), which unpacks tile by tile in VMEM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.ternary_matmul.kernel import ternary_matmul_pallas, unpack_plane

PALLAS_PLATFORMS = ("tpu",)


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


def _tile(size: int, candidates: tuple[int, ...]) -> int:
  return next((c for c in candidates if size % c == 0), size)


def ternary_matmul(codes: jax.Array, act_scale: jax.Array, packed_qn: jax.Array, w_scale: jax.Array, *,
                   backend: str = "auto") -> jax.Array:
  """y [..., N] float32 = x W for x ≈ codes / act_scale (int8, per-token absmax: qsparse_jax.absmax_quantize) and
  W ≈ unpack(packed) · w_scale (per-tensor absmean: qsparse_jax.absmean_ternary, packed by pack_ternary).

  codes: int8 [..., D]; act_scale: [..., 1]; packed_qn: uint8 [D/4, N]; w_scale: scalar.
  """
  if codes.dtype != jnp.int8 or packed_qn.dtype != jnp.uint8:
    raise ValueError(f"expected int8 activation codes and uint8 packed weights, got {codes.dtype} and "
                     f"{packed_qn.dtype}")
  if packed_qn.ndim != 2 or codes.shape[-1] != 4 * packed_qn.shape[0]:
    raise ValueError(f"activations [..., D] need packed weights [D/4, N]: got {codes.shape} and {packed_qn.shape}")
  if act_scale.shape != codes.shape[:-1] + (1,):
    raise ValueError(f"act_scale must be [..., 1] = {codes.shape[:-1] + (1,)}, got {act_scale.shape}")
  impl, interpret = dispatch.resolve(backend, pallas_platforms=PALLAS_PLATFORMS)
  lead, d = codes.shape[:-1], codes.shape[-1]
  codes_td, scale_t1 = codes.reshape(-1, d), act_scale.reshape(-1, 1).astype(jnp.float32)
  w_scale = jnp.asarray(w_scale, jnp.float32)
  if impl == "xla":
    acc = jnp.dot(codes_td, unpack_ternary(packed_qn), preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * (w_scale / scale_t1)
  else:
    t = codes_td.shape[0]
    bt = _tile(t, (256, 128, 64, 32, 16, 8))
    y = ternary_matmul_pallas(codes_td, scale_t1, packed_qn, w_scale, bt=bt,
                              bn=_tile(packed_qn.shape[1], (512, 256, 128)),
                              bq=_tile(packed_qn.shape[0], (512, 256, 128)), interpret=interpret)
  return y.reshape(*lead, packed_qn.shape[1])



