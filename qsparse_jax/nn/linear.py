"""SparseLinear: a drop-in nnx.Linear whose input is top-K sparsified per token (method.md §1), and the plumbing
of a sparsity site: one selection feeding several projections, the kept-entries form of a decode step, packed
ternary weights.

Parameters carry logical axis names ("embed", "mlp", "heads", "kv_heads") as `out_sharding` metadata;
qsparse_jax.parallel.sharding maps them onto a mesh. Shapes: B batch, D input width, K kept entries.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import dispatch
from pallas_kernels.nm_matmul import ops as nm_ops
from pallas_kernels.sparse_matvec import ops as smv_ops
from pallas_kernels.ternary_matmul import ops as tm_ops
from pallas_kernels.topk import ops as topk_ops
from qsparse_jax.ops import (SparsityConfig, absmax_quantize, absmean_scale, absmean_ternary, keep_count, quantize_activations,
                             sparsify, ternarize)
from qsparse_jax.parallel.rowwise import rowwise
from qsparse_jax.parallel.sharding import constrain

DENSE = SparsityConfig()


def logical_axes(axes: tuple[str | None, ...]) -> dict:
  """nnx.Variable metadata naming a parameter's logical axes; no mesh is needed to build a layer (the names are
  mapped to mesh axes, and shardings applied, under jit)."""
  return {"out_sharding": axes, "eager_sharding": False}


def sparsify_site(x: jax.Array, site: SparsityConfig, kernels: str = "auto", width_axis: str | None = None
                  ) -> jax.Array:
  """sparsify(x, site), through pallas_kernels.topk for a plain top-K site when `kernels` may select its kernel.

  kernels: "auto" (the kernel where the program is compiled for a TPU and topk's `kernel_supported` accepts x, the
  plain-JAX path otherwise: the same values and gradients), "xla" or "pallas" (pallas_kernels.dispatch). Sites
  with n:m blocks, int8 activations or the L2 rescale use the plain-JAX operators. Inside a mesh the selection runs
  per shard of rows (parallel.rowwise): no collective inside its loops. width_axis: the logical name of x's last
  axis where the mesh splits it ("heads", "mlp": the inputs of the output and down projections); the sparsified x
  is laid out so again (a local slice of the whole rows the selection read), so that its projection stays
  row-parallel instead of gathering its kernel.
  """
  if site.is_identity:
    return x
  # The straight-through rule of method.md §2 (and §4's quantizer) passes the cotangent unchanged: no per-shard vjp.
  straight_through = site.gradient == "ste" and site.method == "topk" and not site.l2_rescale
  xs = rowwise(lambda x_rd: _sparsify_rows(x_rd, site, kernels), x, straight_through=straight_through)
  if width_axis is not None and xs.ndim >= 2:
    xs = constrain(xs, ("batch",) + (None,) * (xs.ndim - 2) + (width_axis,))
  return xs


def _sparsify_rows(x: jax.Array, site: SparsityConfig, kernels: str) -> jax.Array:
  """sparsify_site on the rows of one shard (parallel.rowwise: each device selects its own rows' top-K)."""
  k = keep_count(x.shape[-1], site.sparsity)
  if 0 < k < x.shape[-1] and site.block is None and site.act_bits is None and not site.l2_rescale:
    if kernels == "pallas" or (kernels == "auto" and topk_ops.kernel_supported(x.shape, x.dtype)):
      return topk_ops.topk_sparsify(x, k, gradient=site.gradient, backend=kernels)
  return sparsify(x, site)


class Kept(NamedTuple):
  """A top-K sparsified input with one token per row, as its kept entries, values [B, K] at indices [B, K], and as
  sparse [B, D] = x ⊙ M, which the CPU path multiplies where it reads a W whole (where nothing reads it, XLA drops
  it)."""

  values: jax.Array
  indices: jax.Array
  sparse: jax.Array


class SiteInput(NamedTuple):
  """One site's input, prepared once for every projection that reads it (`prepare_site`).

  dense: x [..., D] as given (nm_matmul makes its n:m mask from it, tile by tile); sparse: sparsify_site(x) [..., D],
  None when every reader multiplies through nm_matmul; codes: int8 [..., D], absmax_quantize(x) (method.md §4)
  zeroed where sparse is, and scale [..., 1], for packed readers of an act_bits site (ternary_matmul), else None.
  """

  dense: jax.Array
  sparse: jax.Array | None
  codes: jax.Array | None
  scale: jax.Array | None


def keep_entries(x_bd: jax.Array, site: SparsityConfig) -> Kept | None:
  """sparsify(x_bd, site) in kept form, the input of the sparse decode matvec; None where the site keeps every
  entry or is n:m or L2-rescaled (those decode through the dense path). With act_bits the kept values are the
  fake-quantized ones (the per-token scale comes from max|x|, which top-K always keeps)."""
  d = x_bd.shape[-1]
  k = keep_count(d, site.sparsity)
  if not 0 < k < d or site.block is not None or site.l2_rescale:
    return None
  values, indices, mask = smv_ops.topk_entries(x_bd, k)
  if site.act_bits is not None:
    x_bd = quantize_activations(x_bd, site.act_bits)
    values = jnp.take_along_axis(x_bd, indices, axis=-1)
  return Kept(values, indices, jnp.where(mask, x_bd, jnp.zeros_like(x_bd)))


# Name of the [zeros, entries] count a SparseLinear sows for nnx.capture(..., nnx.Intermediate): how many entries of
# the input it multiplied were zero (after its site's top-K, and any zeros the input had already).
INPUT_ZEROS = "input_zeros"


def site_kwargs(cfg: SparsityConfig) -> dict:
  """SparseLinear keyword arguments that reproduce a site config."""
  return dataclasses.asdict(cfg)


class PackedTernary(nnx.Variable):
  """Inference-only state of a packed ternary SparseLinear (SparseLinear.pack): its codes or their scale."""


def cache_ternary_scales(model: nnx.Module) -> int:
  """Give every unpacked ternary SparseLinear of model its absmean scale α + ε (method.md §4) as inference state, in
  place, so that decode steps ternarize only the rows of W their kept entries select (project_kept) instead of the
  whole W at every token. For a model whose weights no longer change (generate does it on its own copy); returns
  how many layers got one."""
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseLinear) and m.ternary_weights
            and not m.is_packed]
  for layer in layers:
    layer.ternary_scale = PackedTernary(absmean_scale(layer.kernel[...]))
  return len(layers)


def pack_ternary_layers(model: nnx.Module) -> int:
  """Pack every ternary SparseLinear of model in place (SparseLinear.pack); returns how many were packed."""
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseLinear) and m.ternary_weights
            and not m.is_packed]
  for layer in layers:
    layer.pack()
  return len(layers)


class SparseLinear(nnx.Linear):
  """A drop-in `nnx.Linear` whose input is top-K sparsified per token: y = (x ⊙ M) W + b (method.md §1).

  Takes every argument of `nnx.Linear` (and is one), plus:
    sparsity: S in [0, 1), the fraction of input entries zeroed per token; 0 makes it exactly nnx.Linear.
    gradient: "ste" (straight-through, method.md §2) or "masked".
    block: (n, m) for Block Q-Sparse (method.md §5) instead of plain top-K.
    act_bits: per-token absmax fake quantization of the input to this many bits (8 in the paper, method.md §4);
      the mask is taken from |x| before quantization.
    ternary_weights: BitNet b1.58 absmean ternary fake quantization of the kernel (method.md §4).
    l2_rescale: see `topk_sparsify`.
    method: "topk", or "relu" for the ablation that sparsifies the input by ReLU instead (SparsityConfig).
    kernel_axes: logical axis names of the [in, out] kernel, default ("embed", "mlp"); the bias gets the second.
    kernels: "auto" | "xla" | "pallas", which implementation of the sparse core to use (see `sparsify_site`); an
      n:m site without act_bits or the L2 rescale multiplies through pallas_kernels.nm_matmul under "pallas", and
      under "auto" where nm_matmul's `kernel_supported` accepts the shapes (its kernel on a TPU, XLA elsewhere,
      with the site's gradient rule either way).

  Input [..., in_features] -> output [..., out_features]. Parameters are `kernel` [in, out] and `bias` [out], named
  as in nnx.Linear, so state moves between the two unchanged.
  """

  def __init__(self, in_features: int, out_features: int, *, sparsity: float = 0.0, gradient: str = "ste",
               block: tuple[int, int] | None = None, act_bits: int | None = None, ternary_weights: bool = False,
               l2_rescale: bool = False, method: str = "topk",
               kernel_axes: tuple[str | None, str | None] = ("embed", "mlp"), kernels: str = "auto",
               rngs: nnx.Rngs, **linear_kwargs):
    site = SparsityConfig(sparsity=sparsity, gradient=gradient, block=tuple(block) if block else None,
                          act_bits=act_bits, l2_rescale=l2_rescale, method=method)
    linear_kwargs.setdefault("kernel_metadata", logical_axes(tuple(kernel_axes)))
    linear_kwargs.setdefault("bias_metadata", logical_axes((kernel_axes[1],)))
    super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
    if site.block is not None and in_features % site.block[1]:
      raise ValueError(f"block m={site.block[1]} must divide in_features={in_features}")
    dispatch.check(kernels)  # validate the name now
    self.site = site
    self.ternary_weights = ternary_weights
    self.kernels = kernels
    # The logical name of the input's last axis where the mesh splits activations along it (the residual stream,
    # "embed", stays whole): sparsify_site's width_axis.
    self.input_axis = None if kernel_axes[0] in (None, "embed") else kernel_axes[0]

  def _n_m_kernel(self, inputs: jax.Array) -> bool:
    """Whether this call multiplies through pallas_kernels.nm_matmul (see the class docstring)."""
    if self.site.block is None or self.site.act_bits is not None or self.site.l2_rescale or self.is_packed:
      return False
    if self.kernels != "auto":
      return self.kernels == "pallas"
    w = self.kernel[...]
    dtype = self.dtype or jnp.promote_types(inputs.dtype, w.dtype)
    return nm_ops.kernel_supported(inputs.shape, w.shape, dtype, dtype, self.site.block[1])

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    return self.multiply(prepare_site(inputs, self), out_sharding)

  def multiply(self, site_input: SiteInput, out_sharding=None) -> jax.Array:
    """y [..., out] = (x ⊙ M) W + b from its site's input prepared once (`prepare_site`): through nm_matmul for an
    n:m site where `kernels` picks it, ternary_matmul (int8 codes x 2-bit codes) when packed with act_bits, the
    fake-quantized kernel (method.md §4) when ternary, a dense dot of the sparsified x otherwise."""
    inputs = site_input.dense
    n_m_kernel = self._n_m_kernel(inputs)
    x = inputs if n_m_kernel else site_input.sparse
    if getattr(self, "__captures__", None) is not None:  # inside nnx.capture (inference.evaluation): count zeros
      seen = sparsify_site(inputs, self.site, "xla") if n_m_kernel else x
      self.sow(nnx.Intermediate, INPUT_ZEROS, jnp.stack([jnp.sum(seen == 0), seen.size]).astype(jnp.float32),
               init_fn=lambda: jnp.zeros(2, jnp.float32), reduce_fn=jnp.add)
    if self.is_packed:
      return self._packed_call(site_input)
    kernel = ternarize(self.kernel[...]) if self.ternary_weights else self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
    if n_m_kernel:  # Block Q-Sparse: the mask is made tile by tile inside the matmul
      y = nm_ops.nm_matmul(x, kernel, *self.site.block, gradient=self.site.gradient, backend=self.kernels)
    else:
      kwargs = {"out_sharding": out_sharding}
      if self.preferred_element_type is not None:
        kwargs["preferred_element_type"] = self.preferred_element_type
      y = self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision, **kwargs)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y

  # ----------------------------------------------------------------------- packed ternary weights (inference)

  @property
  def is_packed(self) -> bool:
    """Whether pack() replaced the float kernel by 2-bit ternary codes."""
    return getattr(self, "packed_kernel", None) is not None

  def pack(self) -> None:
    """Replace the float kernel by the BitNet b1.58 inference form (method.md §4): ternary codes Q_w(W) packed four
    to a byte (pallas_kernels.ternary_matmul.pack_ternary, [in/4, out] uint8) and the scale α + ε. The layer then
    multiplies through ternary_matmul: int8 activation codes times ternary weights, accumulated exactly in int32;
    the same function as the fake-quantized training forward, up to float rounding, reading 1/16 of the bytes."""
    if not self.ternary_weights:
      raise ValueError("only a layer with ternary_weights=True can be packed")
    if self.in_features % 4:
      raise ValueError(f"packing needs in_features divisible by 4, got {self.in_features}")
    if self.site.l2_rescale:
      raise ValueError("a site with l2_rescale cannot be packed (its inputs are not integer codes times a scale)")
    codes, scale = absmean_ternary(self.kernel[...])
    self.packed_kernel = PackedTernary(tm_ops.pack_ternary(codes))
    self.kernel_scale = PackedTernary(scale)
    del self.kernel

  def _packed_call(self, site_input: SiteInput) -> jax.Array:
    """y [..., out] from the packed codes: with act_bits, the site's int8 codes (absmax_quantize of the dense input,
    zeroed by its top-K: the scale comes from max|x|, which top-K keeps) through ternary_matmul; else the sparsified
    float input times the unpacked codes."""
    packed, alpha = self.packed_kernel[...], self.kernel_scale[...]
    if self.site.act_bits is not None:
      y = tm_ops.ternary_matmul(site_input.codes, site_input.scale, packed, alpha, backend=self.kernels)
    else:  # float activations: unpack the codes (exact in float32) and scale once
      y = jnp.dot(site_input.sparse.astype(jnp.float32), tm_ops.unpack_ternary(packed).astype(jnp.float32)) * alpha
    return self._packed_output(y, site_input.dense.dtype)

  def _packed_output(self, y: jax.Array, input_dtype) -> jax.Array:
    """A packed layer's float32 product y [..., out] plus its bias, in its compute dtype (else the input's)."""
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype or input_dtype)

  def project_kept(self, kept: Kept) -> jax.Array:
    """y [B, out] = (x ⊙ M) W + b from the kept entries of x, reading only their rows of W (sparse_matvec)."""
    (y,) = project_kept(kept, self)
    return y

  def decode(self, x_bd: jax.Array) -> jax.Array:
    """The projection of one token per row [B, in]: through its own site's kept entries when it has them (packed
    ternary layers multiply all their 2-bit codes instead: ternary_matmul)."""
    (y,) = decode_site(x_bd, self)
    return y


def prepare_site(inputs: jax.Array, *layers: SparseLinear) -> SiteInput:
  """The input [..., D] of the layers that share one site (q, k and v; gate and up), sparsified once: one top-K
  selection (sparsify_site), and one int8 quantization if a packed layer reads it (method.md §1, §4)."""
  site, kernels = layers[0].site, layers[0].kernels
  if any(layer.site != site or layer.kernels != kernels for layer in layers):
    raise ValueError("layers that share a site must have the same sparsity settings and kernels")
  sparse = codes = scale = None
  if not all(layer._n_m_kernel(inputs) for layer in layers):
    sparse = sparsify_site(inputs, site, kernels, layers[0].input_axis)
  if site.act_bits is not None and any(layer.is_packed for layer in layers):
    codes, scale = rowwise(lambda x_rd: absmax_quantize(x_rd, site.act_bits), inputs)
    codes = jnp.where(sparse != 0, codes, jnp.int8(0))
  return SiteInput(inputs, sparse, codes, scale)


def project(inputs: jax.Array, *layers: SparseLinear) -> tuple[jax.Array, ...]:
  """(x ⊙ M) W_l + b_l [..., out_l] for each layer l that reads the site's input x [..., D]: one selection for all,
  each layer multiplying with the site's full treatment (SparseLinear.multiply)."""
  site_input = prepare_site(inputs, *layers)
  return tuple(layer.multiply(site_input) for layer in layers)


# Batch sizes up to which a packed site's decode step reads the codes of its kept rows (project_kept_packed) on the
# CPU; larger batches multiply every code (ternary_matmul), whose int8 dot pays off once several rows share it.
# Measured on one GLU site (2048 -> 2 x 5632, 40% kept) on the Intel Xeon: kept rows 1.9, 2.7, 4.0, 5.0, 44 ms at
# B = 1, 2, 3, 4, 8 against 47, 7.0, 6.4, 4.3, 5.5 ms for ternary_matmul (XLA's int8 dot is slowest at B = 1).
PACKED_KEPT_MAX_BATCH = 3


def decode_site(x_bd: jax.Array, *layers: SparseLinear) -> tuple[jax.Array, ...]:
  """`project` for one token per row [B, D]: the kept entries of the site feed one sparse_matvecs pass over every
  layer's W (project_kept) where the site has them. Packed ternary layers do the same on the CPU up to
  PACKED_KEPT_MAX_BATCH rows, reading the 2-bit codes of the kept rows only (project_kept_packed); on a TPU or GPU,
  and for larger batches, they multiply all their codes (ternary_matmul)."""
  site = layers[0].site
  b, d = x_bd.shape
  if any(layer.is_packed for layer in layers):
    if (all(layer.is_packed for layer in layers) and 0 < keep_count(d, site.sparsity) < d and site.block is None
        and b <= PACKED_KEPT_MAX_BATCH):
      return jax.lax.platform_dependent(x_bd, cpu=lambda x: project_kept_packed(x, *layers),
                                        default=lambda x: project(x, *layers))
    return project(x_bd, *layers)
  kept = keep_entries(x_bd, site)
  return project(x_bd, *layers) if kept is None else project_kept(kept, *layers)


def project_kept_packed(x_bd: jax.Array, *layers: SparseLinear) -> tuple[jax.Array, ...]:
  """y [B, out_l] of packed ternary layers that share a top-K site, from its K kept entries per row: the kept int8
  codes (absmax_quantize of x, method.md §4; act_bits) or kept values (float activations) times the 2-bit codes of
  the kept rows of every packed W_l (sparse_matvecs), scaled as SparseLinear._packed_call scales. With act_bits the
  sums are of integers below 2**24, exact in float32, so y equals ternary_matmul's bit for bit."""
  site = layers[0].site
  values, indices = smv_ops.topk_values_indices(x_bd, keep_count(x_bd.shape[-1], site.sparsity))
  act_scale = None
  if site.act_bits is not None:
    codes, scale = absmax_quantize(x_bd, site.act_bits)
    values, act_scale = jnp.take_along_axis(codes, indices, axis=-1), scale
  sums = smv_ops.sparse_matvecs(values.astype(jnp.float32), indices, tuple(l.packed_kernel[...] for l in layers),
                                backend="xla")
  ys = []
  for acc, layer in zip(sums, layers):
    alpha = layer.kernel_scale[...]
    ys.append(layer._packed_output(acc * (alpha / act_scale) if act_scale is not None else acc * alpha, x_bd.dtype))
  return tuple(ys)


def project_kept(kept: Kept, *layers: SparseLinear) -> tuple[jax.Array, ...]:
  """y [B, out_l] = (x ⊙ M) W_l + b_l for each layer l that reads the same sparsified input (q, k and v; gate and
  up): one sparse_matvecs pass over the kept entries, reading only their rows of every W_l.

  W stays in its parameter dtype (float32): converting it to a lower compute dtype first would read and write every
  row of it each step, the traffic the kept rows are meant to save. The kept values (exact in float32) multiply the
  selected rows in that dtype, and y comes back in the compute dtype. A ternary W is ternarized row by row as it is
  read, with the scale cache_ternary_scales stored (else computed here, from the whole W)."""
  dtype = layers[0].dtype or kept.values.dtype
  kernels = tuple(l.kernel[...] for l in layers)
  scales = tuple(_ternary_scale(l) if l.ternary_weights else None for l in layers)
  compute = jnp.promote_types(kept.values.dtype, kernels[0].dtype)
  ys = smv_ops.sparse_matvecs(kept.values.astype(compute), kept.indices, kernels, backend=layers[0].kernels,
                              ternary_scales=scales, sparse_bd=kept.sparse.astype(compute))
  return tuple((y if l.bias is None else y + l.bias[...].astype(y.dtype)).astype(dtype) for y, l in zip(ys, layers))


def _ternary_scale(layer: SparseLinear) -> jax.Array:
  """α + ε of a ternary layer's kernel: the one cache_ternary_scales stored, else computed from the whole kernel."""
  cached = getattr(layer, "ternary_scale", None)
  return cached[...] if cached is not None else absmean_scale(layer.kernel[...])
