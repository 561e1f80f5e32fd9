"""Sparse vs dense KV-cache decoding of a 100M-parameter model (issue: sparse inference; target >= 1.8 at batch 1).

One process, float32, random weights: a 103M-parameter decoder (d_model 1024, 8 layers, 16 heads, d_ff 2816, byte
vocabulary, so the dense embedding/unembedding is a negligible 0.5M), decoded greedily for 128 tokens after a
16-token prompt, once with dense projections (sparsity 0) and once with Q-Sparse keeping 40% at every site (the
same weights). After one warm-up generation each, rounds alternate dense and sparse; the figure is the median over
rounds of the steady-state decode rates (prefill and the first, compiling, step excluded). Batch 8 is reported too. The last line is
`decode_sparse_vs_dense_b1: <speedup>`.

    python scripts/bench_decode.py [--tokens 128] [--rounds 3]
"""

import argparse

import jax
import numpy as np
from flax import nnx

from qsparse_jax.decode import SamplingConfig, generate
from qsparse_jax.model import ModelConfig, Transformer, count_params

DENSE = ModelConfig(vocab_size=257, d_model=1024, num_layers=8, num_heads=16, d_ff=2816, max_seq_len=512)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--keep", type=float, default=0.4)
  args = parser.parse_args()
  sparse_cfg = DENSE.with_sparsity(1.0 - args.keep)
  graphdef_dense, params = nnx.split(Transformer(DENSE, rngs=nnx.Rngs(0)))
  graphdef_sparse, _ = nnx.split(nnx.eval_shape(lambda: Transformer(sparse_cfg, rngs=nnx.Rngs(0))))
  print(f"{jax.default_backend()}, float32, {count_params(DENSE)['total'] / 1e6:.1f}M parameters, "
        f"{args.tokens} new tokens after 16, {args.keep:.0%} kept at every site when sparse")
  sampling = SamplingConfig(max_new_tokens=args.tokens)
  rng = np.random.default_rng(0)
  speedups = {}
  for batch in (8, 1):
    prompts = [list(rng.integers(0, 256, 16)) for _ in range(batch)]
    runs = {"dense": (graphdef_dense, DENSE), "sparse": (graphdef_sparse, sparse_cfg)}
    for graphdef, cfg in runs.values():  # warm-up: compile prefill and the decode step for these shapes
      generate(graphdef, params, cfg, prompts, sampling)
    rates = {name: [] for name in runs}
    for _ in range(args.rounds):
      for name, (graphdef, cfg) in runs.items():
        rates[name].append(generate(graphdef, params, cfg, prompts, sampling).tokens_per_second)
    speedups[batch] = float(np.median(np.asarray(rates["sparse"]) / np.asarray(rates["dense"])))
    print(f"batch {batch}: dense {np.median(rates['dense']):7.1f} tokens/s, sparse "
          f"{np.median(rates['sparse']):7.1f} tokens/s: {speedups[batch]:.2f}x")
  print(f"decode_sparse_vs_dense_b1: {speedups[1]:.2f}")


if __name__ == "__main__":
  main()
