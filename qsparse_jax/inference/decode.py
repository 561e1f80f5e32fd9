"""Text generation with a KV cache: prefill the prompts in one call, then decode loops on the device, one token per
row per step and CHUNK steps per loop (the host sees the tokens once per loop, for streaming and stop strings).

Prompts of different lengths go in one batch, right-padded: each row's tokens sit at their own positions, and a
row's first new token comes from the logits at its last prompt position. Decode steps run the sparse path
(Transformer.cached with sparse=True): every projection multiplies only the rows of W that its kept activations
select (pallas_kernels.sparse_matvec; the plain-JAX fast path on the CPU). Sampling is greedy (temperature 0) or
from softmax(logits / temperature) restricted to the top-k tokens and to the smallest set of probability >= top_p.
Prompt lengths and cache sizes are bucketed (powers of two), so requests of many lengths share a few programs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.sparse_matvec import cpu_reads
from qsparse_jax.nn.linear import cache_ternary_scales
from qsparse_jax.nn.model import ModelConfig, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off; stop: strings that end a row; stop_ids:
  tokens that do."""

  max_new_tokens: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  stop_ids: tuple[int, ...] = ()  # token ids that end a row (an end-of-text token), checked on the device

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits_bv: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Next tokens [B] int32 from logits [B, V] (greedy when temperature is 0)."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # the smallest prefix whose probability reaches top_p: keep tokens whose preceding mass is below top_p
    cutoff_index = jnp.sum(cumulative - jax.nn.softmax(sorted_desc, axis=-1) < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# Tokens each device loop decodes before the host sees them (streaming, stop strings, the next loop's launch).
CHUNK = 16
# The smallest prompt and cache buckets: shorter requests share the programs of these sizes.
MIN_BUCKET = 16


def bucket(n: int, cap: int) -> int:
  """The power of two at or above n (at least MIN_BUCKET), at most cap: requests whose sizes share a bucket share
  one compiled program."""
  return min(max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()), cap)


@functools.partial(jax.jit, static_argnames=("graphdef", "sparse", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _prefill(graphdef, params, cache, tokens_bt, last_b, key, *, sparse: bool, temperature: float, top_k: int,
             top_p: float):
  """The prompts [B, T] (right-padded to their bucket) in one model call, and every row's first new token from its
  logits at its last prompt position last_b [B]: (tokens [B] int32, cache)."""
  positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1], dtype=jnp.int32), tokens_bt.shape)
  logits_btv, cache = nnx.merge(graphdef, params).cached(tokens_bt, positions_bt, cache, sparse=sparse)
  last_logits_bv = jnp.take_along_axis(logits_btv, last_b[:, None, None], axis=1)[:, 0]
  next_b = sample_logits(last_logits_bv, jax.random.fold_in(key, 0), temperature=temperature, top_k=top_k,
                         top_p=top_p)
  return next_b, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "sparse", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _decode_chunk(graphdef, params, cache, tokens_b, positions_b, done_b, stop_ids, key, step, *, chunk: int,
                  sparse: bool, temperature: float, top_k: int, top_p: float):
  """Up to `chunk` decode steps on the device, one token per row each: row b's token tokens_b[b] enters at
  positions_b[b], and the sampled one is the next step's input. A row is done once it samples one of stop_ids; the
  loop ends early when every row is. Returns (tokens [chunk, B] int32, -1 after the loop ended, cache, done [B]).

  Sampling keys are fold_in(key, step + i), the same as one call per step would use."""
  model = nnx.merge(graphdef, params)
  b = tokens_b.shape[0]

  def cond(carry):
    i, _, _, _, done_b, _ = carry
    return (i < chunk) & ~jnp.all(done_b)

  def body(carry):
    i, cache, tokens_b, positions_b, done_b, out_cb = carry
    logits_btv, cache = model.cached(tokens_b[:, None], positions_b[:, None], cache, sparse=sparse)
    next_b = sample_logits(logits_btv[:, 0], jax.random.fold_in(key, step + i), temperature=temperature,
                           top_k=top_k, top_p=top_p)
    done_b = done_b | jnp.isin(next_b, stop_ids)
    return i + 1, cache, next_b, positions_b + 1, done_b, out_cb.at[i].set(next_b)

  out_cb = jnp.full((chunk, b), -1, jnp.int32)
  _, cache, _, _, done_b, out_cb = jax.lax.while_loop(cond, body, (0, cache, tokens_b, positions_b, done_b, out_cb))
  return out_cb, cache, done_b


def with_ternary_scales(graphdef, params, cfg: ModelConfig):
  """(graphdef, params) of the model with the absmean scale of each unpacked ternary layer stored beside its kernel
  (linear.cache_ternary_scales): computed once per generate call, so each token ternarizes only its kept rows.
  A model without ternary weights is returned as it is, unmerged."""
  if not cfg.ternary_weights:
    return graphdef, params
  model = nnx.merge(graphdef, params)
  return nnx.split(model) if cache_ternary_scales(model) else (graphdef, params)


@dataclasses.dataclass
class Generation:
  tokens: list[list[int]]  # the new tokens of each prompt (up to and including a stop sequence)
  seconds: float  # wall time of the decode steps after the first one (which compiles): the steady state
  steps: int
  timed_tokens: int  # the tokens those steps produced

  @property
  def tokens_per_second(self) -> float:
    """Steady-state decoding speed (0 when too few steps ran to measure it)."""
    return self.timed_tokens / self.seconds if self.seconds > 0 and self.timed_tokens else 0.0


def check_request(cfg: ModelConfig, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
                  decode_text: Callable[[list[int]], str] | None = None) -> None:
  """ValueError when generate could not serve the request: an empty prompt, prompts too long for the context, stop
  sequences without decode_text."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (an empty prompt has nothing to continue)")
  longest = max(map(len, prompts))
  if longest + sampling.max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"a prompt of {longest} tokens plus {sampling.max_new_tokens} new ones exceeds the model's "
                     f"context of {cfg.max_seq_len} tokens; shorten the prompt or ask for fewer tokens")
  if sampling.stop and decode_text is None:
    raise ValueError("stop sequences need decode_text to compare against")


def generate(graphdef, params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
             decode_text: Callable[[list[int]], str] | None = None, sparse: bool = True,
             on_tokens: Callable[[list[int | None]], None] | None = None) -> Generation:
  """Continue every prompt (token ids) by up to sampling.max_new_tokens tokens.

  decode_text turns ids into text; it is needed to match sampling.stop. A row also ends at any of
  sampling.stop_ids (checked on the device). on_tokens is called with every row's new token (None for rows already
  stopped) once per generated position, for streaming; the host sees the tokens a chunk (CHUNK) at a time.

  The prompts are right-padded to a power-of-two bucket and the KV cache sized to one, so requests within a bucket
  reuse one compiled prefill and one compiled decode loop. With the weights on the CPU, the first decode loop of a
  batch above 1 times once per projection shape how the sparse path reads W (pallas_kernels.sparse_matvec.cpu_reads:
  kept rows in a loop, or W whole), about a second per shape, kept for the process.
  """
  check_request(cfg, prompts, sampling, decode_text=decode_text)
  graphdef, params = with_ternary_scales(graphdef, params, cfg)
  on_cpu = all(device.platform == "cpu" for leaf in jax.tree.leaves(params) if isinstance(leaf, jax.Array)
               for device in leaf.devices())
  with cpu_reads.measuring(on_cpu):  # the CPU picks its batched reads by a measurement at first use
    return _generate(graphdef, params, cfg, prompts, sampling, decode_text=decode_text, sparse=sparse,
                     on_tokens=on_tokens)


def _generate(graphdef, params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *,
              decode_text, sparse: bool, on_tokens) -> Generation:
  longest = max(map(len, prompts))
  b = len(prompts)
  cache_len = bucket(longest + sampling.max_new_tokens, cfg.max_seq_len)
  prompt_len = bucket(longest, cache_len)
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  tokens = np.zeros((b, prompt_len), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, : len(prompt)] = prompt
  options = dict(sparse=sparse, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
  key = jax.random.key(sampling.seed)
  next_b, cache = _prefill(graphdef, params, init_cache(cfg, b, cache_len), jnp.asarray(tokens),
                           jnp.asarray(lengths - 1), key, **options)
  stop_ids = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)

  new = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  start, timed_tokens, steps, loops = None, 0, 0, 0
  pending = np.asarray(next_b)[None]  # [steps, B] tokens the host has not looked at yet
  while True:
    for tokens_b in pending:
      active = np.flatnonzero(~done)
      if loops >= 2:  # tokens of the loops after the first (which compiles): the steady-state rate
        timed_tokens += len(active)
      for row in active:
        token = int(tokens_b[row])
        new[row].append(token)
        if token in sampling.stop_ids or (sampling.stop and any(decode_text(new[row]).endswith(s)
                                                                for s in sampling.stop)):
          done[row] = True
      if on_tokens is not None:
        on_tokens([int(tokens_b[row]) if row in active else None for row in range(b)])
      steps += 1
      if done.all() or steps == sampling.max_new_tokens:
        break
    if done.all() or steps == sampling.max_new_tokens:
      break
    chunk, cache, _ = _decode_chunk(graphdef, params, cache, jnp.asarray(pending[-1]),
                                    jnp.asarray(lengths + steps - 1), jnp.asarray(done), stop_ids, key, steps,
                                    chunk=CHUNK, **options)
    pending = np.asarray(chunk)  # waits for the loop
    pending = pending[: max(1, int(np.sum(np.any(pending >= 0, axis=1))))]
    loops += 1
    if loops == 1:  # the first loop compiles: time the ones after it
      start = time.perf_counter()
  seconds = time.perf_counter() - start if start is not None else 0.0
  return Generation(tokens=new, seconds=seconds, steps=steps, timed_tokens=timed_tokens)
