"""The four sparsity sites are alike: q/k/v and gate/up share one selection of their site and each multiplies with
the site's full treatment, as the output and down projections do (method.md §1, §4, §5): int8 codes x packed 2-bit
ternary codes (ternary_matmul) when packed with act_bits, the n:m kernel (nm_matmul) for Block Q-Sparse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.nn.attention import Attention
from qsparse_jax.nn.feedforward import GLUFeedForward
from qsparse_jax.nn.linear import SparseLinear, decode_site, pack_ternary_layers, project
from qsparse_jax.ops import SparsityConfig


def equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (jit, custom_vjp, cond branches, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from equations(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from equations(sub)


def count_eqns(fn, *args, predicate) -> int:
  return sum(predicate(eqn) for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr))


def int8_dot(eqn) -> bool:
  """ternary_matmul's XLA path: int8 activation codes x int8 ternary codes accumulated in int32."""
  return (eqn.primitive.name == "dot_general" and all(v.aval.dtype == jnp.int8 for v in eqn.invars)
          and eqn.outvars[0].aval.dtype == jnp.int32)


def numpy_int8_ternary(x, w, bias, keep: int):
  """NumPy reference of a packed act_bits=8 projection (method.md §1, §4): the per-token top-`keep` of |x| (ties to
  the lower index), int8 absmax codes Q(x) zeroed off it, absmean ternary codes of W, an exact integer product,
  scaled by α / s once."""
  x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
  x2 = x.reshape(-1, x.shape[-1])
  order = np.argsort(-np.abs(x2), axis=-1, kind="stable")[:, :keep]
  mask = np.zeros(x2.shape, bool)
  np.put_along_axis(mask, order, True, axis=-1)
  scale = np.float32(127.0) / (np.abs(x2).max(-1, keepdims=True) + np.float32(1e-5))
  codes = np.where(mask, np.clip(np.round(x2 * scale), -128, 127), 0).astype(np.int64)
  alpha = np.abs(w).mean(dtype=np.float32) + np.float32(1e-5)
  w_codes = np.clip(np.round(w / alpha), -1, 1).astype(np.int64)
  y = (codes @ w_codes).astype(np.float32) * (alpha / scale) + np.asarray(bias, np.float32)
  return y.reshape(*x.shape[:-1], w.shape[1])


INT8_SITE = SparsityConfig(sparsity=0.5, act_bits=8)


def attention_and_ffn(site, kernels, d=64, heads=4, kv_heads=2, d_ff=96, ternary_weights=None):
  ternary_weights = site.act_bits is not None if ternary_weights is None else ternary_weights
  attn = Attention(d, heads, num_kv_heads=kv_heads, qkv_site=site, out_site=site, qkv_bias=True,
                   ternary_weights=ternary_weights, kernels=kernels, rngs=nnx.Rngs(0))
  ffn = GLUFeedForward(d, d_ff, in_site=site, down_site=site, ternary_weights=ternary_weights,
                       kernels=kernels, rngs=nnx.Rngs(1))
  for layer in (attn.q_proj, attn.k_proj, attn.v_proj):  # biases that are not zero (Qwen2's q/k/v)
    layer.bias[...] = jax.random.normal(jax.random.key(9), layer.bias.shape) * 0.1
  return attn, ffn


def test_packed_qkv_and_gate_up_multiply_int8_codes_by_ternary_codes():
  attn, ffn = attention_and_ffn(INT8_SITE, "xla")
  x = jax.random.normal(jax.random.key(2), (2, 5, 64))
  groups = {"qkv": (attn.q_proj, attn.k_proj, attn.v_proj), "gate_up": (ffn.gate_proj, ffn.up_proj)}
  fake = {name: project(x, *layers) for name, layers in groups.items()}
  weights = {name: [(np.asarray(l.kernel[...]), np.asarray(l.bias[...]) if l.bias is not None else 0.0)
                    for l in layers] for name, layers in groups.items()}
  fake_attn, fake_ffn = attn(x), ffn(x)
  assert pack_ternary_layers(attn) + pack_ternary_layers(ffn) == 7
  for name, layers in groups.items():
    packed = project(x, *layers)
    for y, y_fake, (w, b) in zip(packed, fake[name], weights[name]):
      # The integer product is exact; only the final scaling α / s rounds (float32, one or two ulps).
      np.testing.assert_allclose(np.asarray(y), numpy_int8_ternary(x, w, b, keep=32), rtol=2e-6, atol=1e-6)
      # The fake-quantized training forward sums float32 products of the same values: float32 rounding of sums of
      # 64 O(1) terms.
      np.testing.assert_allclose(np.asarray(y), np.asarray(y_fake), rtol=1e-5, atol=2e-6)
    # One int8 x int8 -> int32 product per projection: ternary_matmul's, not float32 x unpacked codes.
    assert count_eqns(lambda x_: project(x_, *layers), x, predicate=int8_dot) == len(layers)
    decoded = decode_site(x[:, 0], *layers)  # decode steps of packed layers take the same path
    for y_dec, y in zip(decoded, packed):
      np.testing.assert_allclose(np.asarray(y_dec), np.asarray(y[:, 0]), rtol=1e-6, atol=1e-6)
  # Every projection of the packed modules, o_proj and down_proj included (4 + 3), goes through ternary_matmul.
  assert count_eqns(lambda x_: attn(x_), x, predicate=int8_dot) == 4
  assert count_eqns(lambda x_: ffn(x_), x, predicate=int8_dot) == 3
  np.testing.assert_allclose(np.asarray(attn(x)), np.asarray(fake_attn), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ffn(x)), np.asarray(fake_ffn), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("site", [INT8_SITE, SparsityConfig(sparsity=0.5)], ids=["int8", "float"])
def test_packed_decode_on_the_cpu_reads_only_the_codes_of_kept_rows(site):
  """A packed site's decode step on the CPU multiplies its kept entries by the 2-bit codes of their rows only
  (linear.project_kept_packed: sparse_matvecs over the uint8 W), not every code (ternary_matmul). With int8
  activations y is ternary_matmul's bit for bit (sums of integers below 2**24 are exact in float32); with float
  activations the float32 sums differ from the dense dot's only in order."""
  attn, ffn = attention_and_ffn(site, "auto", ternary_weights=True)
  pack_ternary_layers(attn), pack_ternary_layers(ffn)
  x_bd = jax.random.normal(jax.random.key(3), (3, 64))
  for layers in ((attn.q_proj, attn.k_proj, attn.v_proj), (ffn.gate_proj, ffn.up_proj), (ffn.down_proj,)):
    x = x_bd if layers[0].in_features == 64 else jax.random.normal(jax.random.key(4), (3, layers[0].in_features))
    step = jax.jit(lambda x_, layers=layers: decode_site(x_, *layers))
    # every code through ternary_matmul (or the float dot of unpacked codes), jitted as the step is (the bias add
    # fuses the same way in both)
    everything = jax.jit(lambda x_, layers=layers: project(x_, *layers))(x)
    for y, want in zip(step(x), everything):
      if site.act_bits is not None:
        np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
      else:  # float32 sums of 32 kept O(1) products in another order
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
    hlo = step.lower(x).compile().as_text()
    # The row loop, and no dot but the running count's einsums (kept_indices, op names "bni,ij->bnj", ...): no int8
    # dot of all codes, no float dot of unpacked ones.
    assert " while(" in hlo
    assert not [line for line in hlo.splitlines() if " dot(" in line and "->" not in line]


def pallas_calls(eqn) -> bool:
  return eqn.primitive.name == "pallas_call"


@pytest.mark.parametrize("gradient", ["ste", "masked"])
def test_block_sites_multiply_through_nm_matmul_and_match_xla(gradient):
  site = SparsityConfig(block=(2, 4), gradient=gradient)
  shapes = dict(d=128, heads=4, kv_heads=4, d_ff=256)  # every N and D a multiple of 128 (the kernel's lanes)
  x = jax.random.normal(jax.random.key(3), (2, 8, 128))
  one = SparseLinear(128, 128, block=(2, 4), gradient=gradient, kernels="pallas", rngs=nnx.Rngs(0))
  per_layer = count_eqns(lambda x_: one(x_), x, predicate=pallas_calls)
  assert per_layer >= 1
  results = {}
  for kernels in ("pallas", "xla"):
    attn, ffn = attention_and_ffn(site, kernels, **shapes)

    def loss(attn, ffn, x_):
      return jnp.sum(jnp.sin(attn(x_))) + jnp.sum(jnp.sin(ffn(x_)))

    out = (attn(x), ffn(x))
    grads = nnx.grad(loss, argnums=(0, 1, 2))(attn, ffn, x)
    results[kernels] = jax.tree.map(np.asarray, (out, grads))
    # Attention's own kernel (attention_kernels: splash, interpreted under "pallas") is counted apart: the same
    # layers with dense sites run it and no projection kernel.
    dense_attn, _ = attention_and_ffn(SparsityConfig(), kernels, **shapes)
    calls = (count_eqns(lambda x_: attn(x_), x, predicate=pallas_calls)
             - count_eqns(lambda x_: dense_attn(x_), x, predicate=pallas_calls),
             count_eqns(lambda x_: ffn(x_), x, predicate=pallas_calls))
    # "pallas": q, k, v and o each run nm_matmul's kernel, as do gate, up and down; "xla": none does.
    assert calls == ((4 * per_layer, 3 * per_layer) if kernels == "pallas" else (0, 0))
  # The same masks and float32 products (the kernel accumulates in its own tile order): a few ulps.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), results["pallas"],
               results["xla"])


def test_layers_sharing_a_site_must_agree():
  a = SparseLinear(16, 8, sparsity=0.5, rngs=nnx.Rngs(0))
  b = SparseLinear(16, 8, sparsity=0.25, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="layers that share a site"):
    project(jnp.ones((2, 16)), a, b)
