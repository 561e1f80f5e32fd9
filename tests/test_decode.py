"""KV-cache decoding against the uncached forward of the same model, and the sampling filters against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsparse_jax.data import ByteTokenizer
from qsparse_jax.decode import SamplingConfig, generate, sample_logits
from qsparse_jax.model import ModelConfig, Transformer, init_cache

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
