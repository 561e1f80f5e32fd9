"""Q-Sparse training step vs the dense step of the same model, in one process.

    python scripts/bench_train_step.py [--d-model 512] [--layers 4] [--batch 16] [--seq 128] [--repeats 7]

Both steps are the project's jitted train step (forward, backward through the straight-through top-K, AdamW) on the
same float32 model and tokens; Q-Sparse keeps 70% of the entries at every site (the paper's "top-K 70%"). After
warm-up, rounds time one dense and one Q-Sparse step back to back; the ratio is the median over rounds (so a drift
of the shared machine's speed cancels). Peak memory is XLA's compiled-buffer estimate (arguments + outputs +
temporaries - donated aliases) of each step. The last line is `qsparse_vs_dense_step: <Q-Sparse time / dense time>`.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from qsparse_jax.config import TrainConfig
from qsparse_jax.nn.model import ModelConfig, count_params
from qsparse_jax.training.optimizer import make_optimizer
from qsparse_jax.training.step import init_train_state, make_train_step


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--sparsity", type=float, default=0.3)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()

  base = ModelConfig(vocab_size=257, d_model=args.d_model, num_layers=args.layers, num_heads=args.d_model // 64,
                     d_ff=int(args.d_model * 8 / 3) // 64 * 64, max_seq_len=args.seq)
  tx = make_optimizer(TrainConfig())
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch, args.seq + 1)), jnp.int32)
  steps, states, peaks = {}, {}, {}
  for name, cfg in (("dense", base), ("qsparse", base.with_sparsity(args.sparsity))):
    graphdef, states[name] = init_train_state(cfg, tx, seed=0)
    steps[name] = make_train_step(graphdef, tx)
    memory = steps[name].lower(states[name], tokens).compile().memory_analysis()
    peaks[name] = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                   - memory.alias_size_in_bytes)

  def run(name):
    start = time.perf_counter()
    states[name], metrics = steps[name](states[name], tokens)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  for _ in range(2):
    run("dense"), run("qsparse")
  rounds = [(run("dense"), run("qsparse")) for _ in range(args.repeats)]
  results = {"dense": (float(np.median([d for d, _ in rounds])), peaks["dense"]),
             "qsparse": (float(np.median([q for _, q in rounds])), peaks["qsparse"])}
  ratio = float(np.median([q / d for d, q in rounds]))

  counts = count_params(base)
  print(f"backend={jax.default_backend()} float32 d_model={args.d_model} layers={args.layers} "
        f"d_ff={base.d_ff} params={counts['total'] / 1e6:.1f}M tokens/step={args.batch * args.seq}")
  for name, (seconds, peak) in results.items():
    print(f"{name:8s} step {seconds * 1e3:8.1f} ms   peak memory {peak / 2**20:8.1f} MiB")
  print(f"qsparse_peak_memory_vs_dense: {peaks['qsparse'] / peaks['dense']:.3f}")
  print(f"qsparse_vs_dense_step: {ratio:.3f}")


if __name__ == "__main__":
  main()
