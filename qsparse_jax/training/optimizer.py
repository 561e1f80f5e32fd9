"""The optimizer of method.md §7: global-norm clipping, then AdamW (β = 0.9, 0.95) with linear warm-up then cosine or
polynomial decay, weight decay on matrices only."""

from __future__ import annotations

import jax
import optax

from qsparse_jax.config import TrainConfig


def make_schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warm-up to learning_rate, then cosine or polynomial (power 1) decay to end_learning_rate."""
  warmup_steps = min(tc.warmup_steps, tc.steps)  # a short run of a preset keeps its shape
  decay_steps = max(1, tc.steps - warmup_steps)
  if tc.decay == "cosine":
    decay = optax.cosine_decay_schedule(tc.learning_rate, decay_steps, alpha=tc.end_learning_rate / tc.learning_rate)
  elif tc.decay == "polynomial":
    decay = optax.polynomial_schedule(tc.learning_rate, tc.end_learning_rate, power=1.0, transition_steps=decay_steps)
  else:
    raise ValueError(f"train.decay must be 'cosine' or 'polynomial', got {tc.decay!r}")
  warmup = optax.linear_schedule(0.0, tc.learning_rate, max(1, warmup_steps))
  return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW; weight decay applies to matrices (ndim >= 2), not to norm scales."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  return optax.chain(
      optax.clip_by_global_norm(tc.clip_norm),
      optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask),
  )
