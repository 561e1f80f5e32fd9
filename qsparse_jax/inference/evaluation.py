"""`qsparse eval`: validation loss and the sparsity a model actually has on real text (the paper's Table 2).

Q-Sparse configures a sparsity per site, but what a projection skips is measured on its input: top-K zeroes
S · D entries per token, and the input may hold more zeros of its own (the GLU product after ReLU² is often
zero, so the down projection comes out sparser than configured, as in the paper's Table 2: 40/40/40/40/60.4% ->
45.7% overall; method.md §1). Every SparseLinear counts the zero entries of the input it multiplies while
`nnx.capture` runs (layers.INPUT_ZEROS); this module sums them over the validation batches by projection type:

    sparsity(type)   = zeros / entries of the inputs of that type's projections, over all layers and tokens;
    activated params = Σ over projections of (1 − sparsity of its input) · its weight count (non-embedding);
    overall sparsity = 1 − activated params / all projection weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qsparse_jax.config import Config
from qsparse_jax.data import text
from qsparse_jax.nn.linear import INPUT_ZEROS
from qsparse_jax.nn.model import PROJECTION_SITES, ModelConfig, projection_weights, site_keep_fractions

# Projection types in the order of the paper's Table 2, and the SparseLinear attributes of each.
PROJECTION_TYPES = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "out": ("o_proj",), "up": ("up_proj",),
                    "gate": ("gate_proj",), "down": ("down_proj",)}


@dataclasses.dataclass
class Evaluation:
  step: int
  tokens: int  # predicted tokens the figures are measured on
  loss: float  # mean next-token cross-entropy, nats per token
  sparsity: dict[str, float]  # measured, per projection type (PROJECTION_TYPES)
  configured: dict[str, float]  # the sparsity each type's site is set to (n:m sites: 1 − n/m)
  overall: float
  activated_params: float  # non-embedding parameters multiplied per token (measured)
  total_params: float  # all projection weights (the non-embedding parameters a dense token uses)

  @property
  def perplexity(self) -> float:
    return math.exp(self.loss)

  def as_json(self) -> dict:
    return {**dataclasses.asdict(self), "perplexity": self.perplexity}

  def table(self, unit: str = "token") -> str:
    """The Table 2 form: one row of measured sparsity per projection type, then the overall figures. unit: what one
    token is (the tokenizer's unit: "byte" for the byte-level one)."""
    names = list(PROJECTION_TYPES)
    head = "".join(f"{n:>8}" for n in names) + f"{'overall':>9}{'activated':>12}"
    measured = "".join(f"{self.sparsity[n]:8.1%}" for n in names)
    configured = "".join(f"{self.configured[n]:8.1%}" for n in names)
    return "\n".join([
        f"step {self.step}: validation loss {self.loss:.4f} nats/{unit}, perplexity {self.perplexity:.2f} "
        f"({self.tokens} {unit}s)",
        f"{'':>11}{head}",
        f"{'measured':>11}{measured}{self.overall:9.1%}{self.activated_params / 1e6:11.2f}M",
        f"{'configured':>11}{configured}",
        f"activated parameters per token: {self.activated_params / 1e6:.2f}M of {self.total_params / 1e6:.2f}M "
        f"non-embedding ({1 - self.overall:.1%})",
    ])

  def dumps(self) -> str:
    return json.dumps(self.as_json(), indent=2)


def _configured(cfg: ModelConfig) -> dict[str, float]:
  """The configured sparsity of each projection type (its first projection's site)."""
  sites, keep = cfg.sites(), site_keep_fractions(cfg)
  site_of = {t: PROJECTION_SITES[names[0]] for t, names in PROJECTION_TYPES.items()}
  return {t: sites[s].sparsity if sites[s].block is None else 1 - keep[s] for t, s in site_of.items()}


@functools.partial(jax.jit, static_argnames="graphdef")
def _loss_and_zeros(graphdef, params, tokens_bt):
  """(summed next-token loss, {projection name: [zeros, entries] [L, 2]}) for tokens [B, T+1]."""

  def forward(model, inputs):
    return model(inputs)

  logits_btv, sown = nnx.capture(forward, nnx.Intermediate)(nnx.merge(graphdef, params), tokens_bt[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt[:, 1:]).sum()
  counts = {}
  for path, value in nnx.to_flat_state(sown):
    if path[-1] == INPUT_ZEROS:  # (..., "blocks", layer, "attn" | "ffn", "<name>_proj", INPUT_ZEROS)
      counts.setdefault(path[-2], []).append(value.get_value() if hasattr(value, "get_value") else value)
  return loss, {name: jnp.stack(v) for name, v in counts.items()}


def evaluate(graphdef, params, cfg: ModelConfig, batches, *, step: int = 0) -> Evaluation:
  """Loss and measured sparsity of the model over token batches ([B, T+1] arrays)."""
  loss_sum, tokens, zeros = 0.0, 0, {}
  for tokens_bt in batches:
    loss, counts = _loss_and_zeros(graphdef, params, jnp.asarray(tokens_bt))
    loss_sum += float(loss)
    tokens += int(tokens_bt.shape[0] * (tokens_bt.shape[1] - 1))
    for name, c in counts.items():
      zeros[name] = zeros.get(name, 0) + np.asarray(c, np.float64).sum(axis=0)
  if not tokens:
    raise ValueError("no validation batches to evaluate on (the validation split is shorter than one sequence)")
  missing = sorted({n for names in PROJECTION_TYPES.values() for n in names} - set(zeros))
  if missing:
    raise RuntimeError(f"no zero counts were recorded for {missing}; is every projection a SparseLinear?")
  weights = projection_weights(cfg)
  sparsity = {t: sum(zeros[n][0] for n in names) / sum(zeros[n][1] for n in names)
              for t, names in PROJECTION_TYPES.items()}
  per_name = {n: zeros[n][0] / zeros[n][1] for n in weights}
  activated = cfg.num_layers * sum((1 - per_name[n]) * w for n, w in weights.items())
  total = cfg.num_layers * sum(weights.values())
  return Evaluation(step=step, tokens=tokens, loss=loss_sum / tokens, sparsity={k: float(v) for k, v in
                    sparsity.items()}, configured=_configured(cfg), overall=float(1 - activated / total),
                    activated_params=float(activated), total_params=float(total))


def validation_batches(config: Config, tokenizer, *, num_batches: int, batch_size: int) -> list[np.ndarray]:
  """The first num_batches [batch_size, seq_len + 1] token batches of the run's validation split, in order (the
  same text train() evaluates on when batch sizes agree)."""
  dc = config.data
  if dc.format != "text":
    raise ValueError(f"qsparse eval measures text and this run has data.format={dc.format!r}: pass text data, e.g. "
                     "data.format=text data.source=python_stdlib (or data.source=files data.paths=...)")
  source = text.text_source(dc, "validation")
  batches = text.lm_batches(source, tokenizer, seq_len=dc.seq_len, batch_size=batch_size, seed=0,
                                shuffle=False, text_key=dc.tfds_text_key)
  return [np.asarray(b["tokens"]) for _, b in zip(range(num_batches), iter(batches))]
