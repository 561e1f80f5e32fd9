"""KV-cache decoding against the uncached forward of the same model, and the sampling filters against NumPy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.sparse_matvec import cpu_reads
from pallas_kernels.sparse_matvec import ops as smv_ops
from qsparse_jax.data.tokenizers import ByteTokenizer
from qsparse_jax.inference import decode
from qsparse_jax.inference.decode import SamplingConfig, generate, sample_logits
from qsparse_jax.nn.model import ModelConfig, Transformer, init_cache

CFG = ModelConfig(vocab_size=257, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, max_seq_len=48)


def cached_logits(model, cfg, tokens, prefill):
  """Logits of every position: the first `prefill` tokens in one call, then one decode step per token."""
  b, t = tokens.shape
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda p, toks, pos, cache: nnx.merge(graphdef, p).cached(toks, pos, cache))
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  cache = init_cache(cfg, b, t)
  logits, cache = run(params, tokens[:, :prefill], positions[:, :prefill], cache)
  outs = [logits]
  for i in range(prefill, t):
    logits, cache = run(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("sparsity", [0.0, 0.4])
def test_cached_decode_equals_the_uncached_forward(sparsity):
  cfg = CFG.with_sparsity(sparsity)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 20), 0, 257)
  full = nnx.jit(lambda m, toks: m(toks))(model, tokens)
  got = cached_logits(model, cfg, tokens, prefill=7)
  if sparsity == 0.0:  # the same dense arithmetic over the same keys: equal up to the attention's summation order
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-6)
  else:
    # Decode steps take the sparse path (kept entries, sparse_matvec: float32 sums in chunk order) and must select
    # the same entries as the dense masks of the forward pass: a few ulps on O(1) logits.
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-5)


def test_long_cache_decodes_blockwise_like_the_uncached_forward():
  """A 256-entry cache walks its blocks of 128 (nn.cache_attention) in the prefill and in each decode step."""
  cfg = dataclasses.replace(CFG, max_seq_len=256).with_sparsity(0.4)
  model = Transformer(cfg, rngs=nnx.Rngs(6))
  tokens = jax.random.randint(jax.random.key(2), (2, 256), 0, 257)
  full = nnx.jit(lambda m, toks: m(toks))(model, tokens)
  got = cached_logits(model, cfg, tokens[:, :140], prefill=130)  # cache of 140 entries: not a multiple of 128
  np.testing.assert_allclose(got, full[:, :140], rtol=1e-4, atol=1e-5)
  graphdef, params = nnx.split(model)
  run = jax.jit(lambda p, toks, pos, cache: nnx.merge(graphdef, p).cached(toks, pos, cache))
  positions = jnp.broadcast_to(jnp.arange(256), (2, 256))
  logits, cache = run(params, tokens[:, :200], positions[:, :200], init_cache(cfg, 2, 256))
  outs = [logits]
  for i in range(200, 206):
    logits, cache = run(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
    outs.append(logits)
  # online softmax over blocks: float32 sums in another order, a few ulps on O(1) logits
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full[:, :206], rtol=1e-4, atol=1e-5)


def greedy_by_recomputation(model, prompt, n):
  """Greedy continuation with no cache: the whole window re-run per token (one compiled [1, 48] forward)."""
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, toks: nnx.merge(graphdef, p)(toks))
  ids = list(prompt)
  for _ in range(n):
    window = np.zeros((1, CFG.max_seq_len), np.int32)
    window[0, : len(ids)] = ids  # positions after the last token do not affect it (causal)
    ids.append(int(jnp.argmax(forward(params, jnp.asarray(window))[0, len(ids) - 1])))
  return ids[len(prompt):]


def test_batched_prompts_of_different_lengths_decode_like_uncached_greedy():
  cfg = CFG.with_sparsity(0.4)
  model = Transformer(cfg, rngs=nnx.Rngs(2))
  graphdef, params = nnx.split(model)
  prompts = [[5, 70, 33, 9, 120, 7, 7, 81], [44, 2], [100, 101, 102, 103, 104]]
  sampling = SamplingConfig(max_new_tokens=10)
  together = generate(graphdef, params, cfg, prompts, sampling)
  assert together.steps == 10
  for prompt, tokens in zip(prompts, together.tokens):
    assert tokens == greedy_by_recomputation(model, prompt, 10)  # no cache at all


def test_batched_cpu_decode_measures_each_projection_shape_once(monkeypatch):
  """With its weights on the CPU, generate's first decode loop above batch 1 times the reads of each projection
  shape once (cpu_reads.measure; here a fake clock that favours reading every W whole), a second call reuses the
  choices and batch 1 measures nothing; the rows still continue as the uncached greedy forward does."""
  monkeypatch.setattr(cpu_reads, "_CHOSEN", {})
  monkeypatch.setattr(smv_ops, "memory_bound_threads", lambda: 1)  # 256 KiB a loop step: no site here is small
  measured = []

  def fake_measure(batch, k, ws_dn, scales, options, matvecs):
    measured.append((batch, tuple(w.shape for w in ws_dn)))
    return [2.0] * (len(options) - 1) + [1.0]

  monkeypatch.setattr(cpu_reads, "measure", fake_measure)
  cfg = dataclasses.replace(CFG, d_model=256, d_ff=1024, activation="silu").with_sparsity(0.4)  # GLU: gate|up
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(model)
  prompts = [[5, 70, 33, 9], [44, 2], [100, 101, 102]]
  first = generate(graphdef, params, cfg, prompts, SamplingConfig(max_new_tokens=6))
  assert sorted(measured) == sorted({(3, ((256, 256), (256, 128), (256, 128))), (3, ((256, 256),)),
                                     (3, ((256, 1024), (256, 1024))), (3, ((1024, 256),))}), measured
  assert set(cpu_reads._CHOSEN.values()) == {(True,), (True, True), (True, True, True)}
  assert generate(graphdef, params, cfg, prompts, SamplingConfig(max_new_tokens=6)).tokens == first.tokens
  generate(graphdef, params, cfg, prompts[:1], SamplingConfig(max_new_tokens=6))
  assert len(measured) == 4
  for prompt, tokens in zip(prompts, first.tokens):
    assert tokens == greedy_by_recomputation(model, prompt, 6)


def test_prompts_of_many_lengths_share_one_compiled_prefill_and_decode_loop():
  """Prompt lengths 1 to 12 with 20 new tokens fall in one prompt bucket (16) and one cache bucket (32): one compile
  of the prefill and one of the device decode loop (CHUNK steps per loop, so 20 tokens take two loops), and every
  continuation is still the uncached greedy one."""
  cfg = CFG.with_sparsity(0.4)
  model = Transformer(cfg, rngs=nnx.Rngs(4))
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  before = (decode._prefill._cache_size(), decode._decode_chunk._cache_size())
  outputs = {}
  for length in range(1, 13):
    prompt = [int(t) for t in rng.integers(0, 257, length)]
    outputs[length] = (prompt, generate(graphdef, params, cfg, [prompt], SamplingConfig(max_new_tokens=20)).tokens[0])
  after = (decode._prefill._cache_size(), decode._decode_chunk._cache_size())
  assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1, (before, after)
  for length in (1, 12):
    prompt, tokens = outputs[length]
    assert tokens == greedy_by_recomputation(model, prompt, 20)


def test_stop_ids_end_rows_on_the_device():
  """A row ends at its first stop id (kept, as a stop string is); the other rows go on; a loop whose rows have all
  stopped ends early."""
  cfg = CFG.with_sparsity(0.4)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(5)))
  prompts = [[5, 70, 33, 9], [44, 2, 19]]
  free = generate(graphdef, params, cfg, prompts, SamplingConfig(max_new_tokens=24)).tokens
  stop = free[0][5]
  stopped = generate(graphdef, params, cfg, prompts, SamplingConfig(max_new_tokens=24, stop_ids=(stop,))).tokens
  for row in range(2):
    cut = free[row].index(stop) + 1 if stop in free[row] else len(free[row])
    assert stopped[row] == free[row][:cut]
  every = generate(graphdef, params, cfg, prompts,
                   SamplingConfig(max_new_tokens=24, stop_ids=(free[0][1], free[1][1])))
  assert every.tokens == [free[0][:2], free[1][:2]] and every.steps == 2


def test_stop_sequences_streaming_and_seeds():
  cfg = CFG.with_sparsity(0.3)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)))
  tok = ByteTokenizer()
  prompt = [tok.encode("def main():")]
  free = generate(graphdef, params, cfg, prompt * 2, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=7),
                  decode_text=tok.decode)
  again = generate(graphdef, params, cfg, prompt * 2, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=7),
                   decode_text=tok.decode)
  assert free.tokens == again.tokens  # the seed fixes the samples
  text = tok.decode(free.tokens[0])
  stop = text[3:5]  # a piece of what it would write anyway
  streamed = []
  stopped = generate(graphdef, params, cfg, prompt * 2, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=7,
                                                                       stop=(stop,)),
                     decode_text=tok.decode, on_tokens=streamed.append)
  cut = tok.decode(stopped.tokens[0])
  assert cut.endswith(stop) and text.startswith(cut) and stop not in cut[:-len(stop)]
  assert [t for t in (s[0] for s in streamed) if t is not None] == stopped.tokens[0]


def test_sampling_filters_match_numpy():
  probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
  logits = jnp.log(jnp.asarray(probs))
  keys = jax.random.split(jax.random.key(0), 2000)

  def support(**kw):
    samples = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_k=kw.get("top_k", 0),
                                               top_p=kw.get("top_p", 1.0))[0])(keys)
    return np.bincount(np.asarray(samples), minlength=4) / len(keys)

  # top-p keeps the smallest set of most likely tokens with probability >= p, renormalised.
  np.testing.assert_allclose(support(top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.04)
  np.testing.assert_allclose(support(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.04)
  np.testing.assert_allclose(support(top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.04)
  np.testing.assert_allclose(support(), probs[0], atol=0.04)
  assert int(sample_logits(logits, keys[0], temperature=0.0, top_k=0, top_p=1.0)[0]) == 0  # greedy


def test_bad_requests_are_named():
  graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="every prompt needs at least one token"):
    generate(graphdef, params, CFG, [[]], SamplingConfig())
  with pytest.raises(ValueError, match="a prompt of 40 tokens plus 10 new ones exceeds the model's context of 48"):
    generate(graphdef, params, CFG, [[1] * 40], SamplingConfig(max_new_tokens=10))
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
    SamplingConfig(top_p=0.0)


@pytest.mark.parametrize("act_bits,sparsity,block,shape", [(8, 0.4, None, (3, 5, 64)), (None, 0.4, None, (4, 64)),
                                                            (8, 0.0, (2, 4), (2, 64))])
def test_packed_ternary_layer_equals_its_fake_quantized_forward(act_bits, sparsity, block, shape):
  from qsparse_jax.nn import SparseLinear

  layer = SparseLinear(64, 48, sparsity=sparsity, block=block, act_bits=act_bits, ternary_weights=True,
                       use_bias=True, rngs=nnx.Rngs(4))
  layer.bias[...] = jnp.linspace(-1, 1, 48)
  x = jax.random.normal(jax.random.key(5), shape)
  want = layer(x)
  codes = np.asarray(jnp.clip(jnp.round(layer.kernel[...] / (jnp.mean(jnp.abs(layer.kernel[...])) + 1e-5)), -1, 1))
  layer.pack()
  assert not hasattr(layer, "kernel") and layer.packed_kernel[...].shape == (16, 48)
  assert layer.packed_kernel[...].dtype == jnp.uint8
  from pallas_kernels.ternary_matmul import unpack_ternary

  np.testing.assert_array_equal(np.asarray(unpack_ternary(layer.packed_kernel[...])), codes)
  # int8 codes times ternary codes sum exactly in int32 and are scaled once; the fake-quantized forward sums
  # float32 products of the same values: they differ by float32 rounding of sums of 64 O(1) terms.
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(layer.decode(x.reshape(-1, 64))), np.asarray(want).reshape(-1, 48),
                             rtol=1e-5, atol=2e-6)


def test_packed_ternary_model_decodes_like_its_uncached_forward():
  from qsparse_jax.nn import pack_ternary_layers

  # Float activations: int8 ones make later sites' magnitudes integer multiples of one scale, whose exact ties
  # float rounding breaks differently in two summation orders; the int8 path is checked layer by layer above.
  cfg = dataclasses.replace(CFG, ternary_weights=True).with_sparsity(0.4)
  model = Transformer(cfg, rngs=nnx.Rngs(6))
  tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, 257)
  fake = nnx.jit(lambda m, toks: m(toks))(model, tokens)
  assert pack_ternary_layers(model) == 7 * cfg.num_layers
  packed_full = nnx.jit(lambda m, toks: m(toks))(model, tokens)
  np.testing.assert_allclose(packed_full, fake, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(cached_logits(model, cfg, tokens, prefill=5), packed_full, rtol=1e-4, atol=1e-5)
  weights = [x for path, x in nnx.to_flat_state(nnx.state(model)) if path[-1] == "kernel"]
  assert not weights  # no float kernels left in the projections


def test_unpacked_ternary_decode_reads_only_kept_rows_with_scales_computed_once():
  """generate stores each ternary layer's scale once (decode.with_ternary_scales), and its decode steps ternarize
  only the rows they read: the same greedy tokens as the uncached forward, and a decode step that no longer reads
  every kernel to recompute the scale (XLA's byte count of the compiled step drops by at least the kernels' bytes)."""
  from qsparse_jax.nn import linear

  cfg = dataclasses.replace(CFG, ternary_weights=True).with_sparsity(0.4)
  model = Transformer(cfg, rngs=nnx.Rngs(8))
  graphdef, params = nnx.split(model)
  prompt = [5, 70, 33, 9, 120]
  assert generate(graphdef, params, cfg, [prompt], SamplingConfig(max_new_tokens=8)).tokens[0] == (
      greedy_by_recomputation(model, prompt, 8))

  def step_bytes(graphdef, params):
    step = jax.jit(lambda p, toks, pos, cache: nnx.merge(graphdef, p).cached(toks, pos, cache))
    args = (params, jnp.zeros((1, 1), jnp.int32), jnp.full((1, 1), 3, jnp.int32), init_cache(cfg, 1, 16))
    return step.lower(*args).compile().cost_analysis()["bytes accessed"]

  cached_graphdef, cached_params = decode.with_ternary_scales(graphdef, params, cfg)
  kernels = [m.kernel for _, m in nnx.iter_modules(nnx.merge(cached_graphdef, cached_params))
             if isinstance(m, linear.SparseLinear) and getattr(m, "ternary_scale", None) is not None]
  assert len(kernels) == 7 * cfg.num_layers
  kernel_bytes = sum(k[...].nbytes for k in kernels)
  assert step_bytes(graphdef, params) - step_bytes(cached_graphdef, cached_params) >= kernel_bytes


def test_loading_a_ternary_checkpoint_packs_its_weights(tmp_path):
  from qsparse_jax import inference
  from qsparse_jax.training.checkpoint import Checkpointer, meta_json
  from qsparse_jax.config import Config, DataConfig
  from qsparse_jax.nn import pack_ternary_layers
  from qsparse_jax.training.optimizer import make_optimizer
  from qsparse_jax.training.step import init_train_state

  config = Config(model=dataclasses.replace(CFG, ternary_weights=True, act_bits=8).with_sparsity(0.4),
                  data=DataConfig(seq_len=CFG.max_seq_len))
  tx = make_optimizer(config.train)
  _, state = init_train_state(config.model, tx, seed=0)
  state = {**state, "step": jnp.asarray(5, jnp.int32)}
  checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
  checkpointer.save(5, state, meta=meta_json(config), force=True)
  checkpointer.close()
  loaded = inference.load(tmp_path)
  assert loaded.packed and loaded.step == 5
  model = nnx.merge(*nnx.split(Transformer(config.model, rngs=nnx.Rngs(0))))
  nnx.update(model, state["params"])
  pack_ternary_layers(model)
  want = nnx.state(model)
  got = dict(nnx.to_flat_state(loaded.params))
  for path, value in nnx.to_flat_state(want):
    np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(value[...]))
  assert not inference.load(tmp_path, pack=False).packed
