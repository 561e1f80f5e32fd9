"""Causal grouped-query attention that does not hold the [B, H, G, T, S] scores: a fused kernel per platform.

`attention(q_btnk, k_bshk, v_bshk, segment_ids_bt)` picks its implementation by the platform the program is compiled
for (`lax.platform_dependent`, as pallas_kernels.dispatch does), not by the process's default backend, so a program
lowered on a CPU host for a TPU slice (libtpu's deviceless topologies) holds the TPU kernel:

    compiled for   backend "auto"                                              "pallas"             "xla"
    TPU            splash attention (Pallas, jax.experimental.pallas.ops.tpu)  splash attention     XLA path
    CUDA GPU       cuDNN flash attention (jax.nn.dot_product_attention) for    XLA path             XLA path
                   bf16/fp16 and head dims of 8..128, when this host can
                   trace cuDNN (jax's CUDA plugin); the XLA path otherwise
    anything else  the XLA path                                                splash, interpreted  XLA path

The XLA path (`causal_attention` over `causal_mask`) materialises float32 scores [B, H, G, T, S]. Splash attention
pads the head dim and the sequence up to multiples of 128 (exact: padded keys sit after every real query, so the
causal mask hides them; padded queries and head dims are sliced off), so it takes every shape. Mosaic kernels are
not partitioned by XLA: under a mesh set by `jax.set_mesh` the kernel runs per shard inside `jax.shard_map`, batch
over ("data", "fsdp") and heads over "tensor" where they divide (else that axis is replicated); a program XLA
partitions only through its arguments' shardings (no `jax.set_mesh`) takes the XLA path. cuDNN takes segment ids
only as a mask, which it turns into a [B, 1, T, S] bias in q's dtype (packed-layout offsets are not public API):
still quadratic in T, but 2N times smaller than the XLA path's float32 scores.

Shapes: B batch, T query time, S key time (S = T here), N query heads, H kv heads, G = N / H, K head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from pallas_kernels import dispatch

BATCH_AXES, HEAD_AXIS = ("data", "fsdp"), "tensor"  # the mesh axes of qsparse_jax.parallel.sharding.DEFAULT_RULES
SPLASH_BLOCK = 512  # splash's q / kv tiles on v5p and v6e (MaxText's defaults), cut to the padded sequence
SPLASH_TILE = 128  # the sequence and head dim are padded to multiples of this (the TPU lane width)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def causal_mask(positions_bt: jax.Array, segment_ids_bt: jax.Array | None = None) -> jax.Array:
  """[B, T, T] bool: key s visible to query t when s <= t (by position) and, if given, in the same segment."""
  mask = positions_bt[:, None, :] <= positions_bt[:, :, None]
  if segment_ids_bt is not None:
    mask &= segment_ids_bt[:, None, :] == segment_ids_bt[:, :, None]
  return mask


def causal_attention(q_btnk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, mask_bts: jax.Array) -> jax.Array:
  """softmax(q kᵀ / sqrt(K) + mask) v with grouped-query heads (N = H·G), softmax in float32: the XLA path.

  q: [B, T, N, K]; k, v: [B, S, H, K]; mask_bts: [B, T, S] bool, True where query t may attend to key s.
  Returns [B, T, N, K]. Holds the float32 scores [B, H, G, T, S].
  """
  b, t, n, kd = q_btnk.shape
  h = k_bshk.shape[2]
  if n % h:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads H={h}")
  q_bthgk = q_btnk.reshape(b, t, h, n // h, kd)
  logits = jnp.einsum("bthgk,bshk->bhgts", q_bthgk, k_bshk, preferred_element_type=jnp.float32)
  logits = logits * (kd ** -0.5)
  logits = jnp.where(mask_bts[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bshk.dtype)
  out = jnp.einsum("bhgts,bshk->bthgk", probs, v_bshk)
  return out.reshape(b, t, n, kd)


def _xla(q_btnk, k_bshk, v_bshk, segment_ids_bt):
  b, t = q_btnk.shape[:2]
  positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return causal_attention(q_btnk, k_bshk, v_bshk, causal_mask(positions_bt, segment_ids_bt))


def _splash_blocks(t: int) -> splash.BlockSizes:
  """Forward and backward (dq, dkv) tiles of SPLASH_BLOCK, or the largest multiple of 128 dividing t below it."""
  block = dispatch.largest_block(t, SPLASH_BLOCK, SPLASH_TILE)
  return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


def _splash_local(q_btnk, k_bshk, v_bshk, segment_ids_bt, *, interpret: bool):
  """Splash attention on one device (or one shard): pads T and K to multiples of 128, runs the kernel per batch row
  on [N, T, K] / [H, T, K], slices the padding off. segment_ids_bt may be None."""
  t, n, kd = q_btnk.shape[1:]
  tp, kp = dispatch.round_up(t, SPLASH_TILE), dispatch.round_up(kd, SPLASH_TILE)
  q_btnk = (q_btnk.astype(jnp.float32) * kd ** -0.5).astype(q_btnk.dtype)  # splash does not scale the logits

  def padded_bxtk(x_btxk):  # [B, T, X, K] -> [B, X, Tp, Kp]
    return jnp.pad(x_btxk, ((0, 0), (0, tp - t), (0, 0), (0, kp - kd))).transpose(0, 2, 1, 3)

  mask = splash.MultiHeadMask([splash.CausalMask((tp, tp)) for _ in range(n)])
  kernel = splash.make_splash_mha_single_device(mask, block_sizes=_splash_blocks(tp), interpret=interpret)
  q_bntk, k_bhtk, v_bhtk = padded_bxtk(q_btnk), padded_bxtk(k_bshk), padded_bxtk(v_bshk)
  if segment_ids_bt is None:
    out_bntk = jax.vmap(kernel)(q_bntk, k_bhtk, v_bhtk)
  else:
    ids_bt = jnp.pad(segment_ids_bt.astype(jnp.int32), ((0, 0), (0, tp - t)))  # padded queries still see themselves
    out_bntk = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(ids, ids)))(
        q_bntk, k_bhtk, v_bhtk, ids_bt)
  return out_bntk.transpose(0, 2, 1, 3)[:, :t, :, :kd]


def _splash(q_btnk, k_bshk, v_bshk, segment_ids_bt, *, interpret: bool):
  """_splash_local, per shard in jax.shard_map when the mesh set by jax.set_mesh splits the program."""
  mesh = jax.sharding.get_abstract_mesh()
  local = functools.partial(_splash_local, interpret=interpret)
  if not dispatch.partitioned() or mesh.empty:
    return local(q_btnk, k_bshk, v_bshk, segment_ids_bt)
  auto = [a for a in mesh.axis_names if a not in set(getattr(mesh, "manual_axes", ()))]
  batch = tuple(a for a in BATCH_AXES if a in auto)
  batch = batch if batch and q_btnk.shape[0] % int(np.prod([mesh.shape[a] for a in batch])) == 0 else None
  heads = HEAD_AXIS if HEAD_AXIS in auto and k_bshk.shape[2] % mesh.shape[HEAD_AXIS] == 0 else None
  qkv_spec, ids_spec = jax.P(batch, None, heads, None), jax.P(batch, None)
  if segment_ids_bt is None:
    fn = lambda q, k, v: local(q, k, v, None)
    in_specs, args = (qkv_spec,) * 3, (q_btnk, k_bshk, v_bshk)
  else:
    fn, in_specs, args = local, (qkv_spec,) * 3 + (ids_spec,), (q_btnk, k_bshk, v_bshk, segment_ids_bt)
  return jax.shard_map(fn, in_specs=in_specs, out_specs=qkv_spec, axis_names=set(auto), check_vma=False)(*args)


def _cudnn(q_btnk, k_bshk, v_bshk, segment_ids_bt):
  """cuDNN flash attention; segment ids go in as a [B, 1, T, S] mask (cuDNN adds it as a bias)."""
  mask_b1ts = None
  if segment_ids_bt is not None:
    mask_b1ts = segment_ids_bt[:, None, :, None] == segment_ids_bt[:, None, None, :]
  return jax.nn.dot_product_attention(q_btnk, k_bshk, v_bshk, mask=mask_b1ts, is_causal=True, implementation="cudnn")


@functools.lru_cache(maxsize=64)
def _cudnn_traces(shape_q, shape_kv, dtype, segments: bool) -> bool:
  """Whether this host traces cuDNN attention for these shapes (it needs jax's CUDA plugin; on a CPU-only host
  without it cuDNN's version check raises, so the CUDA branch is left out and the program holds the XLA path)."""
  ids = jax.ShapeDtypeStruct(shape_q[:2], jnp.int32) if segments else None
  try:
    jax.eval_shape(_cudnn, jax.ShapeDtypeStruct(shape_q, dtype), *(jax.ShapeDtypeStruct(shape_kv, dtype),) * 2, ids)
    return True
  except (RuntimeError, ValueError, NotImplementedError, TypeError):
    return False


def attention(q_btnk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, segment_ids_bt: jax.Array | None = None, *,
              backend: str = "auto") -> jax.Array:
  """Causal grouped-query self-attention: query t sees keys s <= t (and, with segment ids, only its own segment).

  q: [B, T, N, K]; k, v: [B, T, H, K] with N a multiple of H (query head n reads kv head n // G);
  segment_ids_bt: [B, T] int or None (packed rows: tokens attend within their segment). Softmax in float32;
  returns [B, T, N, K] in q's dtype. backend "auto" | "pallas" | "xla": see the module docstring's table.
  """
  dispatch.check(backend)
  b, t, n, kd = q_btnk.shape
  h = k_bshk.shape[2]
  if n % h or k_bshk.shape != (b, t, h, kd) or v_bshk.shape != k_bshk.shape:
    raise ValueError(f"attention takes q [B, T, N, K] and k, v [B, T, H, K] with H dividing N, got q "
                     f"{q_btnk.shape}, k {k_bshk.shape}, v {v_bshk.shape}")
  args = (q_btnk, k_bshk, v_bshk, segment_ids_bt)
  if backend == "xla":
    return _xla(*args)
  mosaic = functools.partial(_splash, interpret=False)
  if backend == "pallas":
    return lax.platform_dependent(*args, tpu=mosaic, default=functools.partial(_splash, interpret=True))
  # Partitioned by the arguments' shardings alone, the kernel has no mesh to run per shard over (cuDNN's custom
  # call has XLA partitioning rules; Mosaic's has none).
  by_arguments_only = dispatch.partitioned(q_btnk, k_bshk, v_bshk) and jax.sharding.get_abstract_mesh().empty
  branches = {"tpu": _xla if by_arguments_only else mosaic}
  if (any(q_btnk.dtype == d for d in CUDNN_DTYPES) and kd % 8 == 0 and kd <= 128
      and _cudnn_traces(q_btnk.shape, k_bshk.shape, q_btnk.dtype, segment_ids_bt is not None)):
    branches["cuda"] = _cudnn
  return lax.platform_dependent(*args, default=_xla, **branches)
