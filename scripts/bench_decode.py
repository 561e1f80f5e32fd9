"""Sparse vs dense KV-cache decoding of real model depths (issue 20: >= 1.8 at batch 1, >= 1.3 at batch 8).

One process, float32, random weights, byte vocabulary (so the dense embedding/unembedding is negligible):

  tinyllama (the headline), qwen05b: the whole layer stacks of TinyLlama-1.1B (22 layers, d_model 2048, d_ff 5632,
    32 heads, 4 KV heads) and Qwen2-0.5B (24 layers, d_model 896, d_ff 4864, 14 heads, 2 KV heads, q/k/v bias),
    with their grouped-query heads and SwiGLU (the byte vocabulary instead of theirs);
  wide: 2 layers of TinyLlama's shape (103M parameters: its weights fit in a large L3 cache, so it measures less
    of the memory traffic that decoding a real model is bound by); deep: 8 layers of d_model 1024, d_ff 2816.

Each decodes greedily after a 16-token prompt, once with dense projections (sparsity 0) and once with Q-Sparse
keeping 40% at every site (the same weights); with --packed also the 1.58-bit model (the same weights ternarized
and packed, int8 activations, 40% kept). After one warm-up generation each, rounds alternate the models; the figure
is the median over rounds of the steady-state decode rates (prefill and the first, compiling, loop excluded). The
last line is `decode_sparse_vs_dense_b1: <speedup>` of the first model.

    python scripts/bench_decode.py [--models tinyllama] [--tokens 64] [--rounds 3] [--packed]
"""

import argparse
import dataclasses

import jax
import numpy as np
from flax import nnx

from qsparse_jax.inference.decode import SamplingConfig, generate
from qsparse_jax.nn import pack_ternary_layers
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


def packed_model(dense_cfg: ModelConfig, keep: float):
  """(graphdef, params, cfg) of the 1.58-bit model: the same random weights ternarized and packed four codes to a
  byte (pack_ternary_layers), int8 activations, keep at every site; its projections multiply int8 codes by 2-bit
  codes (ternary_matmul)."""
  cfg = dataclasses.replace(dense_cfg, act_bits=8, ternary_weights=True).with_sparsity(1.0 - keep)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  pack_ternary_layers(model)
  graphdef, params = nnx.split(model)
  return graphdef, params, cfg


def speedups(dense_cfg: ModelConfig, keep: float, tokens: int, rounds: int, packed: bool) -> dict[int, float]:
  """Median sparse/dense decode-rate ratio per batch size (8 and 1), printing each batch's rates (and the packed
  1.58-bit model's against the dense one with packed)."""
  sparse_cfg = dense_cfg.with_sparsity(1.0 - keep)
  graphdef_dense, params = nnx.split(Transformer(dense_cfg, rngs=nnx.Rngs(0)))
  graphdef_sparse, _ = nnx.split(nnx.eval_shape(lambda: Transformer(sparse_cfg, rngs=nnx.Rngs(0))))
  runs = {"dense": (graphdef_dense, params, dense_cfg), "sparse": (graphdef_sparse, params, sparse_cfg)}
  if packed:
    runs["packed"] = packed_model(dense_cfg, keep)
  sampling = SamplingConfig(max_new_tokens=tokens)
  rng = np.random.default_rng(0)
  result = {}
  for batch in (8, 1):
    prompts = [list(rng.integers(0, 256, 16)) for _ in range(batch)]
    for run in runs.values():  # warm-up: compile prefill and the decode step for these shapes
      generate(*run, prompts, sampling)
    rates = {name: [] for name in runs}
    for _ in range(rounds):
      for name, run in runs.items():
        rates[name].append(generate(*run, prompts, sampling).tokens_per_second)
    ratio = {name: float(np.median(np.asarray(r) / np.asarray(rates["dense"]))) for name, r in rates.items()}
    result[batch] = ratio["sparse"]
    line = (f"  batch {batch}: dense {np.median(rates['dense']):7.1f} tokens/s, sparse "
            f"{np.median(rates['sparse']):7.1f} tokens/s: {ratio['sparse']:.2f}x")
    if packed:
      line += f"; packed 1.58-bit + int8 {np.median(rates['packed']):7.1f} tokens/s: {ratio['packed']:.2f}x"
    print(line, flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--keep", type=float, default=0.4)
  parser.add_argument("--models", default="tinyllama", help=f"comma-separated, from {sorted(MODELS)}")
  parser.add_argument("--packed", action="store_true", help="also decode the packed 1.58-bit + int8 model")
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
    results[name] = speedups(cfg, args.keep, args.tokens, args.rounds, args.packed)
  print(f"decode_sparse_vs_dense_b1: {results[names[0]][1]:.2f}")


if __name__ == "__main__":
  main()
