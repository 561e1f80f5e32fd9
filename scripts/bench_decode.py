"""Sparse vs dense KV-cache decoding of 100M-parameter models (issue: sparse inference; target >= 1.8 at batch 1).

One process, float32, random weights, byte vocabulary (so the dense embedding/unembedding is negligible). Two
models of 103M parameters:

  wide  (the headline): 2 layers with TinyLlama-1.1B's layer shape, d_model 2048, d_ff 5632, 32 heads;
  deep: 8 layers of d_model 1024, d_ff 2816, 16 heads;
  tinyllama, qwen05b: the whole layer stacks of TinyLlama-1.1B (22 layers) and Qwen2-0.5B (24), with their
    grouped-query heads and SwiGLU (the byte vocabulary instead of theirs), for `--models tinyllama`.

Each decodes greedily for 128 tokens after a 16-token prompt, once with dense projections (sparsity 0) and once with
Q-Sparse keeping 40% at every site (the same weights). After one warm-up generation each, rounds alternate dense and
sparse; the figure is the median over rounds of the steady-state decode rates (prefill and the first, compiling,
step excluded). The last line is `decode_sparse_vs_dense_b1: <speedup>` of the wide model.

    python scripts/bench_decode.py [--tokens 128] [--rounds 3] [--models wide,deep]
    python scripts/bench_decode.py --models tinyllama --tokens 32 --rounds 1   (its last line is that model's)
"""

import argparse

import jax
import numpy as np
from flax import nnx

from qsparse_jax.inference.decode import SamplingConfig, generate
from qsparse_jax.nn.model import ModelConfig, Transformer, count_params

MODELS = {
    "wide": ModelConfig(vocab_size=257, d_model=2048, num_layers=2, num_heads=32, d_ff=5632, max_seq_len=512),
    "deep": ModelConfig(vocab_size=257, d_model=1024, num_layers=8, num_heads=16, d_ff=2816, max_seq_len=512),
    # whole real models' shapes (issue 20): TinyLlama-1.1B and Qwen2-0.5B, SwiGLU, grouped-query attention
    "tinyllama": ModelConfig(vocab_size=257, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=4, d_ff=5632,
                             activation="silu", max_seq_len=512),
    "qwen05b": ModelConfig(vocab_size=257, d_model=896, num_layers=24, num_heads=14, num_kv_heads=2, d_ff=4864,
                           activation="silu", qkv_bias=True, max_seq_len=512),
}


def speedups(dense_cfg: ModelConfig, keep: float, tokens: int, rounds: int) -> dict[int, float]:
  """Median sparse/dense decode-rate ratio per batch size (8 and 1), printing each batch's rates."""
  sparse_cfg = dense_cfg.with_sparsity(1.0 - keep)
  graphdef_dense, params = nnx.split(Transformer(dense_cfg, rngs=nnx.Rngs(0)))
  graphdef_sparse, _ = nnx.split(nnx.eval_shape(lambda: Transformer(sparse_cfg, rngs=nnx.Rngs(0))))
  sampling = SamplingConfig(max_new_tokens=tokens)
  rng = np.random.default_rng(0)
  result = {}
  for batch in (8, 1):
    prompts = [list(rng.integers(0, 256, 16)) for _ in range(batch)]
    runs = {"dense": (graphdef_dense, dense_cfg), "sparse": (graphdef_sparse, sparse_cfg)}
    for graphdef, cfg in runs.values():  # warm-up: compile prefill and the decode step for these shapes
      generate(graphdef, params, cfg, prompts, sampling)
    rates = {name: [] for name in runs}
    for _ in range(rounds):
      for name, (graphdef, cfg) in runs.items():
        rates[name].append(generate(graphdef, params, cfg, prompts, sampling).tokens_per_second)
    result[batch] = float(np.median(np.asarray(rates["sparse"]) / np.asarray(rates["dense"])))
    print(f"  batch {batch}: dense {np.median(rates['dense']):7.1f} tokens/s, sparse "
          f"{np.median(rates['sparse']):7.1f} tokens/s: {result[batch]:.2f}x", flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--keep", type=float, default=0.4)
  parser.add_argument("--models", default="wide,deep", help=f"comma-separated, from {sorted(MODELS)}")
  args = parser.parse_args()
  names = args.models.split(",")
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
  print(f"{jax.default_backend()}, float32, {args.tokens} new tokens after 16, {args.keep:.0%} kept at every site "
        f"when sparse")
  results = {}
  for name in names:
    cfg = MODELS[name]
    print(f"{name}: {count_params(cfg)['total'] / 1e6:.1f}M parameters, {cfg.num_layers} layers, d_model "
          f"{cfg.d_model}, d_ff {cfg.d_ff}", flush=True)
    results[name] = speedups(cfg, args.keep, args.tokens, args.rounds)
  print(f"decode_sparse_vs_dense_b1: {results[names[0]][1]:.2f}")


if __name__ == "__main__":
  main()
