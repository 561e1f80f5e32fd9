"""Text generation with a KV cache: prefill the prompts in one call, then one token per row per step.

Prompts of different lengths go in one batch, right-padded: each row's tokens sit at their own positions, and a
row's first new token comes from the logits at its last prompt position. Decode steps run the sparse path
(Transformer.cached with sparse=True): every projection multiplies only the rows of W that its kept activations
select (pallas_kernels.sparse_matvec; the plain-JAX fast path on the CPU). Sampling is greedy (temperature 0) or
from softmax(logits / temperature) restricted to the top-k tokens and to the smallest set of probability >= top_p.
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

from qsparse_jax.nn.model import ModelConfig, init_cache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off; stop: strings that end a row."""

  max_new_tokens: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()

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


@functools.partial(jax.jit, static_argnames=("graphdef", "sparse", "temperature", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _forward_and_sample(graphdef, params, cache, tokens_bt, positions_bt, last_b, key, step, *, sparse: bool,
                        temperature: float, top_k: int, top_p: float):
  """One model call on new tokens [B, T] (the prompts, or one token per row) and the next token of every row from
  its logits at position last_b [B] of the call: (next tokens [B] int32, cache). One dispatch per decode step."""
  logits_btv, cache = nnx.merge(graphdef, params).cached(tokens_bt, positions_bt, cache, sparse=sparse)
  last_logits_bv = jnp.take_along_axis(logits_btv, last_b[:, None, None], axis=1)[:, 0]
  next_b = sample_logits(last_logits_bv, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k,
                         top_p=top_p)
  return next_b, cache


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

  decode_text turns ids into text; it is needed to match sampling.stop. on_tokens is called after each step with
  every row's new token (None for rows already stopped), for streaming.
  """
  check_request(cfg, prompts, sampling, decode_text=decode_text)
  longest = max(map(len, prompts))
  b = len(prompts)
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  tokens = np.zeros((b, longest), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, : len(prompt)] = prompt
  positions = np.broadcast_to(np.arange(longest, dtype=np.int32), (b, longest))
  cache = init_cache(cfg, b, longest + sampling.max_new_tokens)
  run = functools.partial(_forward_and_sample, graphdef, params, sparse=sparse, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p)
  key = jax.random.key(sampling.seed)
  next_tokens, cache = run(cache, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(lengths - 1), key, 0)

  new = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  last_b = jnp.zeros((b,), jnp.int32)
  start, timed_tokens, steps = None, 0, 0
  for step in range(sampling.max_new_tokens):
    next_tokens = np.asarray(next_tokens)
    active = np.flatnonzero(~done)
    if step >= 2:  # tokens from the decode calls after the first (which compiles): the steady-state rate
      timed_tokens += len(active)
    for row in active:
      new[row].append(int(next_tokens[row]))
      if sampling.stop and any(decode_text(new[row]).endswith(s) for s in sampling.stop):
        done[row] = True
    if on_tokens is not None:
      on_tokens([int(next_tokens[row]) if row in active else None for row in range(b)])
    steps += 1
    if done.all() or step == sampling.max_new_tokens - 1:
      break
    next_tokens, cache = run(cache, next_tokens[:, None], (lengths + step)[:, None], last_b, key, step + 1)
    if step == 0:
      jax.block_until_ready(next_tokens)
      start = time.perf_counter()
  seconds = time.perf_counter() - start if start is not None else 0.0
  return Generation(tokens=new, seconds=seconds, steps=steps, timed_tokens=timed_tokens)
